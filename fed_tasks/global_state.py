"""What every party derives from the released sums: feature scaling, then the weights.

The orchestrator advances it as sums are released. In a secure-sum job each site also
advances it, by one step: it opens the previous round's sum itself (the orchestrator cannot)
and trains from the result. Both sides therefore share this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fed_tasks.codec import PayloadError
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
