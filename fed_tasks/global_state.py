"""What every party derives from the released sums: feature scaling, then the model.

The orchestrator advances it as sums are released. In a secure-sum job each site also
advances it, by one step: it opens the previous round's sum itself (the orchestrator cannot)
and trains from the result. Both sides therefore share this one rule.

Training rounds move the weights; every other released sum (moments, histograms, a Deep
SVDD centre, the threshold's score counts) is kept as it was released, under
``"action:pass"`` in :attr:`GlobalState.extra`, and what follows from it (a PCA basis, HBOS
densities, the threshold) is derived from there by the same functions on every side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.preprocessing import Moments, Standardizer
from fed_tasks.schedule import SUMMED_ACTIONS
from fed_tasks.strategy import SummedUpdate


def extra_key(action: str, rnd: int) -> str:
    return f"{action}:{int(rnd)}"


@dataclass
class GlobalState:
    """The global model as far as the released sums go."""

    weights: np.ndarray
    norm: Standardizer | None = None
    loss: float = float("nan")  # mean training loss of the last applied round
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    # a server optimizer's moments (FedAdam, FedYogi), an adaptive DP clip (dp_step.CLIP_KEY):
    # derived from the sums like the weights
    server: dict[str, np.ndarray] = field(default_factory=dict)

    def advance(self, action: str, summed: np.ndarray, strategy: Any = None,
                rnd: int = 1) -> None:
        """Apply one released sum: statistics set the scaling, a round moves the weights
        (by the job's strategy, :mod:`fed_tasks.strategies`), any other sum is kept for the
        detector to derive its model from."""
        if action == "stats":
            self.norm = Standardizer.from_moments(Moments.from_vector(summed))
            # kept too: a compressed secure job weighs its update by rows / the total
            self.extra[extra_key(action, 0)] = np.asarray(summed, dtype=np.float64).copy()
        elif action == "fit":
            from fed_tasks.strategies.base import Strategy

            update = SummedUpdate(np.asarray(summed, dtype=np.float64))
            strategy = strategy or Strategy()
            self.weights = strategy.step(self.weights, update, self.server)
            if strategy.adaptive_clip is None:
                self.loss = update.mean_loss
            else:  # the loss slot carries the noisy clipping count: it moves the clip
                strategy.adaptive_clip.advance(self.server, update)
                self.loss = float("nan")
        elif action in SUMMED_ACTIONS:
            self.extra[extra_key(action, rnd)] = np.asarray(summed, dtype=np.float64).copy()
        else:
            raise PayloadError(f"no global state follows from a {action!r} sum")
