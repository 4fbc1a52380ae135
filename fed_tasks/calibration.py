"""The alarm threshold from summed histograms of the sites' scores: no score leaves a site.

A detector ranks rows; an alarm needs a threshold, and the natural one is the score that a
target fraction of training rows exceeds (the false-positive rate on normal rows, if
anomalies among the training rows are rare). Each site counts its training rows' scores
into bins everyone knows; only the (securely) summed counts are released. Two passes:

1. ``COARSE`` equal bins of ``u = asinh(score)`` over ``[-U_RANGE, U_RANGE]`` plus an
   underflow and an overflow bin; every party finds the bin holding the target quantile;
2. that bin cut again into ``COARSE`` equal bins; the threshold is interpolated linearly
   inside the fine bin holding the quantile (resolution ≈ 4e-5 in u).

Sites and orchestrator derive the bins of pass 2 and the threshold with the same functions
from the released sums in the model state, so neither trusts the other for them.

Under differential privacy (pca and hbos jobs, :mod:`fed_tasks.dp_sums`) each pass's counts
carry Gaussian noise, the same std in every bin, so fewer bins mean less noise on the counts
above the threshold: ``DP_COARSE`` bins per pass. The noisy counts are summed as released
(negative ones included: clipping them at 0 would add about 0.4 std of phantom rows to every
empty bin, which with 1,024 bins is more rows than the job has); only the interpolation
inside the quantile's bin clips. Measured on shuttle at epsilon 0.5-3 (34k training rows,
benchmarks/privacy_utility.py): 4.3-5.6 % of the training rows score above the threshold for
a 5 % target; with 1,024 bins and negative counts clipped, under 1 %.
"""

from __future__ import annotations

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.spec import ROW_DP_MODELS, JobSpec

COARSE = 1024
DP_COARSE = 64  # bins per pass under DP (see above)
U_RANGE = 20.0  # asinh(20) ≈ 2.4e8: scores beyond are clamped into the overflow bins
PASSES = 2


def enabled(spec: JobSpec) -> bool:
    """Whether the job calibrates a threshold. Under DP only for the detectors whose sites
    noise the counts (pca, hbos); a DP neural job's sites have no per-row noise for them."""
    return spec.target_fpr is not None and (not spec.dp_enabled
                                            or spec.model in ROW_DP_MODELS)


def bins(spec: JobSpec) -> int:
    """Inner bins per pass (each pass also has an underflow and an overflow bin)."""
    return DP_COARSE if spec.dp_enabled else COARSE


def phase(spec: JobSpec):
    from fed_tasks.schedule import COUNT_CODEC, Phase

    return Phase("calibrate", PASSES, bins(spec) + 2, COUNT_CODEC)


def key(k: int) -> str:
    return f"calibrate:{k}"


def _range(extra: dict[str, np.ndarray], spec: JobSpec, k: int) -> tuple[float, float]:
    """The u-interval pass ``k`` bins (pass 1: all of it; pass 2: pass 1's quantile bin)."""
    if k == 1:
        return -U_RANGE, U_RANGE
    if k != 2:
        raise PayloadError(f"calibration has passes 1..{PASSES}, not {k}")
    previous = extra.get(key(1))
    if previous is None:
        raise PayloadError("calibration pass 2 needs the released sum of pass 1")
    lo, hi = _range(extra, spec, 1)
    b, _ = _quantile_bin(previous, _target(spec))
    width = (hi - lo) / bins(spec)
    if b == 0:  # below the range: refine the stretch just below it
        return lo - (hi - lo), lo
    if b == bins(spec) + 1:
        return hi, hi + (hi - lo)
    return lo + (b - 1) * width, lo + b * width


def _target(spec: JobSpec) -> float:
    assert spec.target_fpr is not None
    return 1.0 - float(spec.target_fpr)


def _quantile_bin(counts: np.ndarray, q: float) -> tuple[int, float]:
    """(bin holding the q-quantile, rows the quantile lies above inside that bin).

    The first bin where the running count reaches the quantile. Noisy (DP) counts are summed
    as they are, negative ones included (unbiased); exact counts are never negative, and
    their running count is increasing, so this is the usual sorted search."""
    counts = np.rint(np.asarray(counts, dtype=np.float64))
    total = float(counts.sum())
    if total <= 0:
        raise PayloadError("no training row was counted for the threshold")
    need = q * total
    cum = np.cumsum(counts)
    reached = np.flatnonzero(cum >= need)
    b = int(reached[0]) if len(reached) else len(counts) - 1
    before = float(cum[b - 1]) if b > 0 else 0.0
    return b, need - before


def local_counts(spec: JobSpec, k: int, extra: dict[str, np.ndarray],
                 scores: np.ndarray) -> np.ndarray:
    """A site's contribution to pass ``k``: its training rows' scores counted into bins."""
    lo, hi = _range(extra, spec, k)
    n = bins(spec)
    u = np.arcsinh(np.asarray(scores, dtype=np.float64))
    u = np.nan_to_num(u, nan=hi, posinf=hi, neginf=lo)  # a NaN score is an alarm, not lost
    inner = np.clip(np.floor((u - lo) / (hi - lo) * n).astype(np.int64) + 1, 1, n)
    idx = np.where(u < lo, 0, np.where(u >= hi, n + 1, inner))
    return np.bincount(idx, minlength=n + 2).astype(np.float64)


def threshold(spec: JobSpec, extra: dict[str, np.ndarray]) -> float | None:
    """The calibrated threshold once both passes are released (None before)."""
    fine = extra.get(key(PASSES))
    if fine is None or not enabled(spec):
        return None
    lo, hi = _range(extra, spec, PASSES)
    b, inside = _quantile_bin(fine, _target(spec))
    width = (hi - lo) / bins(spec)
    if b == 0:
        u = lo
    elif b == bins(spec) + 1:
        u = hi
    else:  # linear inside the bin; a noisy count is clipped to at least one row here
        inside = max(inside, 0.0)
        u = lo + (b - 1 + min(1.0, inside / max(float(np.rint(fine[b])), 1.0))) * width
    return float(np.sinh(u))
