"""Which fixed-point encoding each aggregated vector uses; sites and aggregators agree on it.

Secure aggregation sums integers, so every vector a site contributes is quantized first,
with the encoding of its phase (:mod:`fed_tasks.schedule`): training contributions
``[n·Δ, n·loss, n]`` are bounded by ``spec.update_bound``; the one-off feature statistics
are large but need little precision; histogram counts are integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fed_tasks.schedule import STATS_CODEC as STATS_CODEC
from fed_tasks.schedule import codec_for as codec_for
from fed_tasks.schedule import (
    max_length,
    phases,
    slot_at,
    slot_index,
    total_slots,
    vector_length,
)
from fed_tasks.spec import JobSpec


def secagg_plan(spec: JobSpec, n_sites: int) -> dict[str, Any]:
    """Parameters of the job's secure-sum session, derived identically by every party.

    One session covers the job: session round s + 1 sums slot s. Vectors are padded to the
    longest phase. Each session round masks modulo its own phase's width (``round_bits``:
    that phase's encoding summed over all member sites), so a training round of 16-bit
    values is not sent at the width of the 52-bit statistics; ``bits`` is the widest.
    """
    from privacy.secagg import default_threshold

    round_bits = [p.codec.bits_per_value(n_sites) for p in phases(spec) for _ in range(p.count)]
    bits = max(round_bits)
    if bits > 64:
        raise ValueError(f"secure sum needs {bits}-bit values; lower update_bound or frac_bits")
    return {"threshold": default_threshold(n_sites), "bits": bits,
            "rounds": total_slots(spec), "vector_length": max_length(spec),
            "round_bits": round_bits}


def session_round(spec: JobSpec, action: str, rnd: int) -> int:
    return slot_index(spec, action, rnd) + 1


def session_action(spec: JobSpec, r: int) -> tuple[str, int]:
    """Which call (action, pass) a session round sums (the inverse of :func:`session_round`)."""
    return slot_at(spec, r - 1)


def decode_session_sum(spec: JobSpec, r: int, residues: np.ndarray,
                       n_terms: int) -> tuple[str, np.ndarray]:
    """Session round r's opened sum as floats, decoded alike by sites and orchestrator."""
    action, _ = session_action(spec, r)
    values = residues[:vector_length(spec, action)]
    return action, codec_for(spec, action).decode_sum([int(v) for v in values], n_terms=n_terms)
