"""Histogram-based outlier score (HBOS, Goldstein & Dengel 2012) from summed histograms.

Sites count their standardized rows into per-feature bins fixed in advance
(:mod:`fed_tasks.histograms`); only the summed counts leave. The score of a row is
``Σ_j −log density_j(z_j)``: rare values on any feature add up. Densities are per unit of
z, with half a row of pseudo-count per bin, so an empty bin is improbable, not impossible.
Counts are integers, so the federated detector equals the centralized one exactly.

The counts are smoothed before they become densities: each inner bin's count is spread over
its neighbours by a Gaussian kernel in ``u = asinh(z)``, of bandwidth
``h = 1.06·σ_u·n^(-1/5)`` (the normal-reference rule, Silverman 1986; σ_u the feature's
spread in u, from the counts), i.e. a kernel density estimate on the fixed bins. The raw
64-bin histogram is too rough for a few hundred rows: on pima (537 training rows) most bins
hold a handful of rows, and a row's score depended on which side of an edge it fell. The
bandwidth shrinks with n: about one bin on pima and breastw (~500 rows), under half a bin on
shuttle (34k rows), which keeps its detail.
Measured on seeds 3–7 of ``benchmarks/detection.py``'s split (not the seeds it reports),
pooled test ROC-AUC federated / local-only, raw → smoothed: pima 0.635 / 0.622 → 0.673 /
0.662, breastw 0.993 / 0.990 → 0.995 / 0.989, shuttle 0.995 / 0.974 → 0.996 / 0.983 (a
kernel of half that width gave pima 0.646). Still a function of the summed counts only.

Under differential privacy (:mod:`fed_tasks.dp_sums`) the summed counts carry Gaussian noise
and can be negative: they are rounded and clipped at 0, and the pseudo-count keeps every bin's
density positive. (Zeroing counts below 1-3 noise stds instead was measured worse on shuttle.)
"""

from __future__ import annotations

import numpy as np

from fed_tasks import histograms
from fed_tasks.detectors.base import FederatedDetector, released
from fed_tasks.global_state import GlobalState
from fed_tasks.spec import JobSpec

PSEUDO = 0.5
BANDWIDTH = 1.06  # the normal-reference rule's constant: h = 1.06·σ·n^(-1/5)


def smoothed(counts: np.ndarray, bins: int = histograms.BINS) -> np.ndarray:
    """``counts`` (d × (bins + 2)) with each feature's inner bins spread by a Gaussian kernel
    in u of bandwidth ``BANDWIDTH·σ_u·n^(-1/5)``; every bin's mass is kept (the kernel is
    renormalized inside the range), the two overflow bins are left as they are."""
    du = 2.0 * histograms.U_MAX / bins
    centres = histograms.edges(bins)[:-1] + du / 2.0
    out = counts.copy()
    for j, row in enumerate(counts[:, 1:-1]):
        inner = row.sum()
        if inner <= 0:
            continue
        mean = row @ centres / inner
        spread = max(float(np.sqrt(row @ (centres - mean) ** 2 / inner)), du)
        h = BANDWIDTH * spread * float(counts[j].sum()) ** -0.2
        kernel = np.exp(-0.5 * ((centres[:, None] - centres[None, :]) / h) ** 2)
        out[j, 1:-1] = (kernel / kernel.sum(axis=0, keepdims=True)) @ row
    return out


def bin_widths(bins: int = histograms.BINS) -> np.ndarray:
    """Width in z of each bin, overflow bins counted as one more u-unit beyond the range."""
    e = histograms.edges(bins)
    u = np.concatenate([[e[0] - 1.0], e, [e[-1] + 1.0]])
    return np.diff(histograms.from_u(u))


class HBOSDetector(FederatedDetector):
    """HBOS on shared bins, smoothed; ``fit(z)`` on standardized rows, or from summed
    counts."""

    name = "hbos"
    title = "a histogram model from the summed per-feature histograms of your rows"
    leaves = "per feature, how many of your rows fall in each of 66 fixed bins"

    def __init__(self, bins: int = histograms.BINS) -> None:
        self.bins = bins
        self.log_density_: np.ndarray | None = None

    def fit(self, z: np.ndarray) -> HBOSDetector:
        return self.fit_counts(histograms.counts(z, self.bins))

    def fit_counts(self, counts: np.ndarray) -> HBOSDetector:
        counts = np.maximum(np.rint(np.asarray(counts, dtype=np.float64)), 0.0)
        counts = counts.reshape(-1, self.bins + 2)
        n = counts.sum(axis=1, keepdims=True)
        if np.any(n <= 0):
            raise ValueError("HBOS needs at least one row")
        density = ((smoothed(counts, self.bins) + PSEUDO) / (n + PSEUDO * counts.shape[1])
                   / bin_widths(self.bins))
        self.log_density_ = np.log(density)
        return self

    def score_samples(self, z: np.ndarray) -> np.ndarray:
        if self.log_density_ is None:
            raise ValueError("fit the detector first")
        idx = histograms.bin_index(np.atleast_2d(z), self.bins)
        cols = np.arange(idx.shape[1])
        return -np.sum(self.log_density_[cols, idx], axis=1)

    # ---- federated rules -------------------------------------------------------------
    @classmethod
    def phases(cls, spec: JobSpec) -> tuple:
        from fed_tasks.schedule import COUNT_CODEC, Phase

        return (Phase("hist", 1, len(spec.features) * (histograms.BINS + 2), COUNT_CODEC),)

    @classmethod
    def contribute(cls, spec: JobSpec, action: str, k: int, z: np.ndarray,
                   state: GlobalState) -> np.ndarray:
        if action != "hist":
            return super().contribute(spec, action, k, z, state)
        return histograms.counts(z).ravel()

    @classmethod
    def from_state(cls, spec: JobSpec, state: GlobalState) -> HBOSDetector:
        return cls().fit_counts(released(state, "hist:1"))
