"""Which fixed-point encoding each aggregated vector uses; sites and aggregators agree on it.

Secure aggregation sums integers, so every vector a site contributes is quantized first.
Training contributions are ``[n·Δ, n·loss, n]`` with entries bounded by ``spec.update_bound``;
the one-off feature statistics (counts, sums, sums of squares) are large but need little
precision.
"""

from __future__ import annotations

import numpy as np

from fed_tasks.spec import JobSpec
from privacy.fixed_point import FixedPointCodec

STATS_CODEC = FixedPointCodec(frac_bits=8, bound=2.0**44)


def codec_for(spec: JobSpec, action: str) -> FixedPointCodec:
    if action == "stats":
        return STATS_CODEC
    return FixedPointCodec(frac_bits=spec.frac_bits, bound=spec.update_bound)


def round_id(action: str, rnd: int) -> int:
    """One id per aggregated call of a job: 0 for statistics, r for training round r."""
    return 0 if action == "stats" else int(rnd)


def secagg_plan(spec: JobSpec, n_sites: int) -> dict[str, int]:
    """Parameters of the job's secure-sum session, derived identically by every party.

    One session covers the job: session round 1 sums the statistics, round r + 1 the
    training round r. Vectors are padded to one length; the modulus fits either encoding
    summed over all member sites.
    """
    from fed_tasks.site_step import vector_length
    from privacy.secagg import default_threshold

    bits = max(codec_for(spec, a).bits_per_value(n_sites) for a in ("stats", "fit"))
    if bits > 64:
        raise ValueError(f"secure sum needs {bits}-bit values; lower update_bound or frac_bits")
    return {"threshold": default_threshold(n_sites), "bits": bits, "rounds": spec.rounds + 1,
            "vector_length": max(vector_length(spec, a) for a in ("stats", "fit"))}


def session_round(action: str, rnd: int) -> int:
    return round_id(action, rnd) + 1


def session_action(r: int) -> str:
    """Which call a session round sums (the inverse of :func:`session_round`)."""
    return "stats" if r == 1 else "fit"


def decode_session_sum(spec: JobSpec, r: int, residues: np.ndarray,
                       n_terms: int) -> tuple[str, np.ndarray]:
    """Session round r's opened sum as floats, decoded alike by sites and orchestrator."""
    from fed_tasks.site_step import vector_length

    action = session_action(r)
    values = residues[:vector_length(spec, action)]
    return action, codec_for(spec, action).decode_sum([int(v) for v in values], n_terms=n_terms)
