"""Which fixed-point encoding each aggregated vector uses; sites and aggregators agree on it.

Secure aggregation sums integers, so every vector a site contributes is quantized first.
Training contributions are ``[n·Δ, n·loss, n]`` with entries bounded by ``spec.update_bound``;
the one-off feature statistics (counts, sums, sums of squares) are large but need little
precision.
"""

from __future__ import annotations

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
