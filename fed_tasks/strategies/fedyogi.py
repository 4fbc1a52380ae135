"""FedYogi (Reddi et al. 2021): FedAdam whose second moment grows only as fast as the
squared updates demand, so rare large updates do not shrink every later step."""

from __future__ import annotations

import numpy as np

from fed_tasks.strategies.fedadam import BETA2, FedAdam


class FedYogi(FedAdam):
    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return v - (1.0 - BETA2) * g2 * np.sign(v - g2)
