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
"""

from __future__ import annotations

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.spec import JobSpec

COARSE = 1024
U_RANGE = 20.0  # asinh(20) ≈ 2.4e8: scores beyond are clamped into the overflow bins
PASSES = 2


def enabled(spec: JobSpec) -> bool:
    """Whether the job calibrates a threshold (not under DP yet: the counts are un-noised)."""
    return spec.target_fpr is not None and not spec.dp_enabled


def phase(spec: JobSpec):
    from fed_tasks.schedule import COUNT_CODEC, Phase

    return Phase("calibrate", PASSES, COARSE + 2, COUNT_CODEC)


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
    width = (hi - lo) / COARSE
    if b == 0:  # below the range: refine the stretch just below it
        return lo - (hi - lo), lo
    if b == COARSE + 1:
        return hi, hi + (hi - lo)
    return lo + (b - 1) * width, lo + b * width


def _target(spec: JobSpec) -> float:
    assert spec.target_fpr is not None
    return 1.0 - float(spec.target_fpr)


def _quantile_bin(counts: np.ndarray, q: float) -> tuple[int, float]:
    """(bin holding the q-quantile, rows the quantile lies above inside that bin)."""
    counts = np.maximum(np.rint(np.asarray(counts, dtype=np.float64)), 0.0)
    total = float(counts.sum())
    if total <= 0:
        raise PayloadError("no training row was counted for the threshold")
    need = q * total
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, need, side="left"))
    b = min(b, len(counts) - 1)
    before = float(cum[b - 1]) if b > 0 else 0.0
    return b, need - before


def local_counts(spec: JobSpec, k: int, extra: dict[str, np.ndarray],
                 scores: np.ndarray) -> np.ndarray:
    """A site's contribution to pass ``k``: its training rows' scores counted into bins."""
    lo, hi = _range(extra, spec, k)
    u = np.arcsinh(np.asarray(scores, dtype=np.float64))
    u = np.nan_to_num(u, nan=hi, posinf=hi, neginf=lo)  # a NaN score is an alarm, not lost
    inner = np.clip(np.floor((u - lo) / (hi - lo) * COARSE).astype(np.int64) + 1, 1, COARSE)
    idx = np.where(u < lo, 0, np.where(u >= hi, COARSE + 1, inner))
    return np.bincount(idx, minlength=COARSE + 2).astype(np.float64)


def threshold(spec: JobSpec, extra: dict[str, np.ndarray]) -> float | None:
    """The calibrated threshold once both passes are released (None before)."""
    fine = extra.get(key(PASSES))
    if fine is None or not enabled(spec):
        return None
    lo, hi = _range(extra, spec, PASSES)
    counts = np.maximum(np.rint(fine), 0.0)
    q = _target(spec)
    b, inside = _quantile_bin(counts, q)
    width = (hi - lo) / COARSE
    if b == 0:
        u = lo
    elif b == COARSE + 1:
        u = hi
    else:
        u = lo + (b - 1 + min(1.0, inside / max(counts[b], 1.0))) * width
    return float(np.sinh(u))
