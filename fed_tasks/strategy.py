"""Turning the sum of site updates into the next global model (Flower-style strategies).

Every site sends one vector ``[n·Δ, n·loss, n]`` (Δ = local weights − global weights; a
compressed secure job scales it by 1/N, :mod:`fed_tasks.compression`, which leaves the means
unchanged), so the orchestrator only ever needs the *sum* of those vectors — which is
exactly what secure aggregation can give it without revealing any single site's vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pack_update(delta: np.ndarray, loss: float, n: int) -> np.ndarray:
    """A site's contribution: sample-weighted delta, weighted loss, and the weight."""
    return np.concatenate([n * np.asarray(delta, dtype=np.float64), [n * loss, float(n)]])


@dataclass(frozen=True)
class SummedUpdate:
    """The decoded sum of all contributions of one round."""

    vector: np.ndarray

    @property
    def total_weight(self) -> float:
        return float(self.vector[-1])

    @property
    def mean_delta(self) -> np.ndarray:
        return self.vector[:-2] / self.total_weight

    @property
    def mean_loss(self) -> float:
        return float(self.vector[-2] / self.total_weight)
