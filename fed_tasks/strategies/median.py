"""Coordinate-wise median (Yin et al. 2018): one site cannot move a coordinate past the
others' middle value, however far it sends it."""

from __future__ import annotations

import numpy as np

from fed_tasks.strategies.base import Strategy, as_sum, per_site


class FedMedian(Strategy):
    name = "median"
    individual = True

    def aggregate(self, updates: dict[str, np.ndarray]) -> np.ndarray:
        _, deltas, losses = per_site(updates)
        return as_sum(np.median(deltas, axis=0), float(np.median(losses)), len(losses))
