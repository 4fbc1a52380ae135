"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct each site's drift.

Every site keeps its own control variate ``c_i`` (the gradient of its loss at the global
model, option I), private and persisted in its directory between rounds; the federation's
variate ``c`` is the mean of the sites' ``c_i`` as far as the released sums go. During local
training each gradient gets ``c − c_i`` added, steering a site with unusual data towards
the federation's direction. A site sends ``[n·Δw, Δc_i, 1, n·loss, n]``: the change of its
variate travels through the same (secure) sum as the weights, and ``c`` moves by the mean
change — every party, each site included, derives it from the sum alone.
"""

from __future__ import annotations

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.strategies.base import Strategy
from fed_tasks.strategy import SummedUpdate


class Scaffold(Strategy):
    name = "scaffold"

    def step(self, weights: np.ndarray, update: SummedUpdate,
             server: dict[str, np.ndarray]) -> np.ndarray:
        p, v = len(weights), update.vector
        if v.size != 2 * p + 3:
            raise PayloadError(f"a SCAFFOLD aggregate has {2 * p + 3} values, got {v.size}")
        n, sites = float(v[-1]), float(v[2 * p])
        if n <= 0 or sites <= 0:
            raise PayloadError("no site contributed to this round")
        server["c"] = server.get("c", np.zeros(p)) + v[p:2 * p] / sites
        return weights + v[:p] / n
