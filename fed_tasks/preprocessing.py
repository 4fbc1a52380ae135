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


@dataclass(frozen=True)
class Standardizer:
    """Feature-wise (x - mean) / std with a floor on std so constant columns stay finite."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_moments(cls, m: Moments, floor: float = 1e-6) -> Standardizer:
        if m.count < 2:
            raise ValueError("need at least two rows to standardize")
        mean = m.total / m.count
        var = np.maximum(m.total_sq / m.count - np.square(mean), 0.0)
        return cls(mean, np.maximum(np.sqrt(var), floor))

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
