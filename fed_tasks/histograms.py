"""Per-feature histograms on bin edges every party knows without looking at any row.

Histograms can be summed securely only if every site counts into the same bins, and the
bins must not come from one site's data. So the edges are fixed in advance, in coordinates
the federation derived together: ``u = asinh(z)`` of the federated standardization ``z``
(asinh keeps the centre linear and squashes heavy tails). ``BINS`` equal bins cover
``[-U_MAX, U_MAX]``; two overflow bins (below, above) catch the rest, so no row is lost.
Used by HBOS (densities) and the federated isolation forest (quantile map).
"""

from __future__ import annotations

import numpy as np

U_MAX = 7.0  # asinh(7) ≈ 548 standard deviations: only true outliers overflow
BINS = 64


def edges(bins: int = BINS) -> np.ndarray:
    """The ``bins + 1`` inner edges in u-coordinates."""
    return np.linspace(-U_MAX, U_MAX, bins + 1)


def to_u(z: np.ndarray) -> np.ndarray:
    return np.arcsinh(np.asarray(z, dtype=np.float64))


def from_u(u: np.ndarray) -> np.ndarray:
    return np.sinh(np.asarray(u, dtype=np.float64))


def bin_index(z: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Bin of each value, 0 = below ``-U_MAX``, 1..bins inner, bins + 1 = above (int64)."""
    u = to_u(z)
    inner = np.floor((u + U_MAX) / (2 * U_MAX) * bins).astype(np.int64) + 1
    inner = np.clip(inner, 1, bins)
    return np.where(u < -U_MAX, 0, np.where(u >= U_MAX, bins + 1, inner))


def counts(z: np.ndarray, bins: int = BINS) -> np.ndarray:
    """``(d, bins + 2)`` counts of standardized rows ``z`` (n × d), one row per feature."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    idx = bin_index(z, bins)
    out = np.zeros((z.shape[1], bins + 2), dtype=np.float64)
    for j in range(z.shape[1]):
        out[j] = np.bincount(idx[:, j], minlength=bins + 2)
    return out
