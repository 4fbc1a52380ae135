"""PCA detector from securely summed second moments: exact in every aggregation mode.

Sites send ``[Σ z zᵀ (upper triangle), Σ z, n]`` of their standardized rows; the covariance,
its eigenvectors and every score follow from that sum alone, so the federated detector
equals the centralized one on the union of the rows up to fixed-point rounding.
Score: the row's squared projection on every principal axis, each scaled by that axis's
variance (the weighted reconstruction error of pyod's PCA, i.e. the Mahalanobis distance):
rows that break the correlations normal rows keep score high even where no single feature
is extreme. (Measured: the minor components alone lose shuttle, 0.52 against 0.98.)

Under differential privacy (:mod:`fed_tasks.dp_sums`) each site clips its rows to L2 norm
``dp_row_clip`` before summing and the sum is noised; the noise swamps the smallest
eigenvalues (on shuttle several are ~1e-3), and dividing by a noise-sized variance would let
noise dominate the score. So the eigenvalues are floored at the noise's own scale on the
covariance, about the spectral norm of a symmetric noise matrix, 2·√d·σ/n (σ the noise std
of the sum): measured on shuttle at epsilon 1, ROC-AUC 0.996 with the floor against 0.6-0.9
with eigenvalues merely clipped at 0.
"""

from __future__ import annotations

import numpy as np

from fed_tasks.detectors.base import FederatedDetector, released
from fed_tasks.global_state import GlobalState
from fed_tasks.spec import JobSpec

Z_CLIP = 50.0  # per value: each product ≤ 2,500, so 2.7e7 rows fit the moment encoding
RIDGE = 1e-6  # relative to the mean variance: a dead direction cannot divide by zero


def moment_length(d: int) -> int:
    return d * (d + 1) // 2 + d + 1


def moment_sums(z: np.ndarray) -> np.ndarray:
    """One site's contribution: upper triangle of Σzzᵀ, Σz, n (z clipped to ±Z_CLIP)."""
    z = np.clip(np.asarray(z, dtype=np.float64), -Z_CLIP, Z_CLIP)
    iu = np.triu_indices(z.shape[1])
    return np.concatenate([(z.T @ z)[iu], z.sum(axis=0), [float(z.shape[0])]])


class PCADetector(FederatedDetector):
    """PCA score; ``fit(z)`` on standardized rows, or ``fit_sums`` from summed moments."""

    name = "pca"
    title = "a principal-component model from the summed second moments of your rows"
    leaves = "the sums of products of every pair of standardized features (one d×d matrix)"

    def __init__(self) -> None:
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.eigenvalues_: np.ndarray | None = None

    def fit(self, z: np.ndarray) -> PCADetector:
        return self.fit_sums(moment_sums(z))

    def fit_sums(self, summed: np.ndarray, noise_std: float = 0.0) -> PCADetector:
        """The detector of all rows whose moment sums are ``summed``; ``noise_std``: the std
        of the DP noise on each summed value (0: exact sums)."""
        v = np.asarray(summed, dtype=np.float64)
        d = int((np.sqrt(8 * len(v) + 1) - 3) // 2)  # len = d(d+1)/2 + d + 1
        if moment_length(d) != len(v):
            raise ValueError(f"a moment sum of {len(v)} values fits no feature count")
        n = float(v[-1])
        if n < 2:
            raise ValueError("PCA needs at least two rows")
        tri = np.zeros((d, d))
        tri[np.triu_indices(d)] = v[:d * (d + 1) // 2]
        second = tri + np.triu(tri, 1).T
        mean = v[d * (d + 1) // 2:-1] / n
        cov = second / n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(values)[::-1]
        floor = 2.0 * np.sqrt(d) * noise_std / n  # ≈ the noise's spectral norm on cov
        values, vectors = np.maximum(values[order], floor), vectors[:, order]
        self.mean_, self.components_ = mean, vectors
        self.eigenvalues_ = values + RIDGE * max(values.mean(), 1e-12)
        return self

    def score_samples(self, z: np.ndarray) -> np.ndarray:
        if self.components_ is None or self.mean_ is None or self.eigenvalues_ is None:
            raise ValueError("fit the detector first")
        proj = (np.asarray(z, dtype=np.float64) - self.mean_) @ self.components_
        return np.sum(proj ** 2 / self.eigenvalues_, axis=1)

    # ---- federated rules -------------------------------------------------------------
    @classmethod
    def phases(cls, spec: JobSpec) -> tuple:
        from fed_tasks.schedule import MOMENT_CODEC, Phase

        return (Phase("moments2", 1, moment_length(len(spec.features)), MOMENT_CODEC),)

    @classmethod
    def contribute(cls, spec: JobSpec, action: str, k: int, z: np.ndarray,
                   state: GlobalState) -> np.ndarray:
        if action != "moments2":
            return super().contribute(spec, action, k, z, state)
        if spec.dp_enabled:  # bounds one row's effect on the sum (fed_tasks/dp_sums.py)
            from fed_tasks.dp_sums import clip_rows

            z = clip_rows(z, spec.dp_row_clip)
        return moment_sums(z)

    @classmethod
    def from_state(cls, spec: JobSpec, state: GlobalState) -> PCADetector:
        noise = 0.0
        if spec.dp_enabled:
            from fed_tasks.dp_sums import noise_std

            noise = noise_std(spec, "moments2")
        return cls().fit_sums(released(state, "moments2:1"), noise_std=noise)
