"""What every party derives from the released sums: feature scaling, then the weights.

The orchestrator advances it as sums are released. In a secure-sum job each site also
advances it, by one step: it opens the previous round's sum itself (the orchestrator cannot)
and trains from the result. Both sides therefore share this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fed_tasks.codec import PayloadError, decode_array, encode_array
from fed_tasks.preprocessing import Moments, Standardizer
from fed_tasks.strategy import FedAvg, SummedUpdate


@dataclass
class GlobalState:
    """The global model as far as the released sums go."""

    weights: np.ndarray
    norm: Standardizer | None = None
    loss: float = float("nan")  # mean training loss of the last applied round

    def advance(self, action: str, summed: np.ndarray, strategy: FedAvg | None = None) -> None:
        """Apply one released sum: statistics set the scaling, a round moves the weights."""
        if action == "stats":
            self.norm = Standardizer.from_moments(Moments.from_vector(summed))
        elif action == "fit":
            update = SummedUpdate(np.asarray(summed, dtype=np.float64))
            self.weights = (strategy or FedAvg()).aggregate(self.weights, update)
            self.loss = update.mean_loss
        else:
            raise PayloadError(f"no global state follows from a {action!r} sum")

    def message(self, rnd: int) -> dict[str, Any]:
        """What a training call carries: the round, the weights and (once known) the scaling."""
        return {"round": rnd, "weights": encode_array(self.weights),
                "norm": self.norm.to_dict() if self.norm is not None else None}

    @classmethod
    def from_message(cls, message: dict[str, Any], n_params: int) -> GlobalState:
        norm = message.get("norm")
        return cls(decode_array(message["weights"], n_params),
                   Standardizer.from_dict(norm) if norm is not None else None)
