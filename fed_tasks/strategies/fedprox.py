"""FedProx (Li et al. 2020): a proximal term keeps each site near the global model.

Aggregation is FedAvg's; the sites' local objective gains ``mu/2 · ‖w − w_global‖²``, which
limits how far a site with unusual data drifts within a round.
"""

from __future__ import annotations

from typing import Any

from fed_tasks.spec import JobSpec
from fed_tasks.strategies.base import Strategy


class FedProx(Strategy):
    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> FedProx:
        return cls(spec.prox_mu)

    def local_options(self) -> dict[str, Any]:
        return {"prox_mu": self.mu}
