"""Krum and Multi-Krum (Blanchard et al. 2017): keep the updates closest to their
neighbours. Each site's score is the summed squared distance to its ``k − f − 2`` nearest
other updates (``f``: sites that may be malicious); the ``m`` lowest-scoring updates are
averaged (``m = 1``: Krum; ``m = k − f``: Multi-Krum, the default)."""

from __future__ import annotations

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.spec import JobSpec
from fed_tasks.strategies.base import Strategy, as_sum, per_site


class Krum(Strategy):
    name = "krum"
    individual = True

    def __init__(self, byzantine: int, keep: int | None = None) -> None:
        self.f, self.keep = int(byzantine), keep

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Krum:
        return cls(spec.krum_byzantine)

    def aggregate(self, updates: dict[str, np.ndarray]) -> np.ndarray:
        _, deltas, losses = per_site(updates)
        k = len(losses)
        neighbours = k - self.f - 2
        if neighbours < 1:
            raise PayloadError(f"Krum with f={self.f} needs at least {self.f + 3} updates, "
                               f"got {k}")
        sq = np.sum(deltas ** 2, axis=1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * deltas @ deltas.T, 0.0)
        np.fill_diagonal(dist, np.inf)
        scores = np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)
        m = self.keep if self.keep is not None else k - self.f
        chosen = np.argsort(scores, kind="stable")[:m]  # ties: the first site in name order
        return as_sum(deltas[chosen].mean(axis=0), float(losses[chosen].mean()), k)
