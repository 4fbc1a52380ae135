"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, the largest and smallest
``beta`` fraction of the sites' values are dropped and the rest averaged."""

from __future__ import annotations

import math

import numpy as np

from fed_tasks.spec import JobSpec
from fed_tasks.strategies.base import Strategy, as_sum, per_site


class FedTrimmedAvg(Strategy):
    name = "trimmed-mean"
    individual = True

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> FedTrimmedAvg:
        return cls(spec.trim_ratio)

    def aggregate(self, updates: dict[str, np.ndarray]) -> np.ndarray:
        _, deltas, losses = per_site(updates)
        k = len(losses)
        cut = min(math.floor(self.beta * k), (k - 1) // 2)  # always keep at least one
        kept = np.sort(deltas, axis=0)[cut:k - cut]
        middle = np.sort(losses)[cut:k - cut]
        return as_sum(kept.mean(axis=0), float(middle.mean()), k)
