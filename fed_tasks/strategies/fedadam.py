"""FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The round's mean update Δ is a pseudo-gradient for an adaptive optimizer on the server
side: ``m ← β1·m + (1−β1)·Δ``; Adam ``v ← β2·v + (1−β2)·Δ²``, Yogi
``v ← v − (1−β2)·Δ²·sign(v − Δ²)``; ``w ← w + η·m / (√v + τ)``. The moments are part of
the global state that every party (each site included) derives from the released sums
alone, so they work in every aggregation mode.
"""

from __future__ import annotations

import numpy as np

from fed_tasks.spec import JobSpec
from fed_tasks.strategies.base import Strategy
from fed_tasks.strategy import SummedUpdate

BETA1, BETA2, TAU = 0.9, 0.99, 1e-3


class FedAdam(Strategy):
    name = "fedadam"

    def __init__(self, eta: float) -> None:
        self.eta = float(eta)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> FedAdam:
        return cls(spec.server_lr)

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return BETA2 * v + (1.0 - BETA2) * g2

    def step(self, weights: np.ndarray, update: SummedUpdate,
             server: dict[str, np.ndarray]) -> np.ndarray:
        g = super().step(weights, update, server) - weights
        m = BETA1 * server.get("m", np.zeros_like(g)) + (1.0 - BETA1) * g
        v = self._second_moment(server.get("v", np.full_like(g, TAU ** 2)), g * g)
        server["m"], server["v"] = m, v
        return weights + self.eta * m / (np.sqrt(v) + TAU)
