"""Standardization from federated moments: sites share counts and sums, never rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a site's features: count, sum and sum of squares."""

    count: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        x = np.asarray(x, dtype=np.float64)
        return cls(int(x.shape[0]), x.sum(axis=0), np.square(x).sum(axis=0))

    def to_vector(self) -> np.ndarray:
        return np.concatenate([[float(self.count)], self.total, self.total_sq])

    @classmethod
    def from_vector(cls, v: np.ndarray) -> Moments:
        d = (len(v) - 1) // 2
        return cls(int(round(float(v[0]))), np.asarray(v[1:1 + d]), np.asarray(v[1 + d:]))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total,
                       self.total_sq + other.total_sq)


#: the scale of a feature constant across the federation: every value maps to z = 0, so a
#: test row that differs from the training constant cannot swamp the score (|x| ≤ 1e150)
DEAD_STD = 1e300
#: the statistics are summed in fixed point with 2^-8 resolution per site value: a variance
#: within this many such rounding errors of zero is a constant column, not a signal
ROUNDING_SLACK = 64 * 2.0**-8


@dataclass(frozen=True)
class Standardizer:
    """Feature-wise (x - mean) / std; a column constant over the federation's training rows
    (variance within the summed statistics' rounding) is dead: z = 0 for every value.

    Sites cannot drop such a column themselves (a column constant at one site need not be
    constant at another), so it stays in the schema and carries nothing."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_moments(cls, m: Moments, floor: float = 1e-6) -> Standardizer:
        if m.count < 2:
            raise ValueError("need at least two rows to standardize")
        mean = m.total / m.count
        var = np.maximum(m.total_sq / m.count - np.square(mean), 0.0)
        dead = var <= ROUNDING_SLACK * (1.0 + 2.0 * np.abs(mean)) / m.count
        return cls(mean, np.where(dead, DEAD_STD, np.maximum(np.sqrt(var), floor)))

    @property
    def dead(self) -> np.ndarray:
        """Features constant over the federation's training rows (they score nothing)."""
        return self.std >= DEAD_STD

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        return cls.from_moments(Moments.of(x))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Standardizer:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))
