"""The strategy interface and the per-site view that robust strategies share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.spec import JobSpec
from fed_tasks.strategy import SummedUpdate

if TYPE_CHECKING:
    from fed_tasks.dp_step import AdaptiveClip


class Strategy:
    """Weighted sum of the sites' ``[n·Δ, n·loss, n]``: federated averaging."""

    name: ClassVar[str] = "fedavg"
    #: needs each site's update in clear, so plain mode only
    individual: ClassVar[bool] = False
    #: DP-FedAvg with adaptive clipping: the rule that moves the clip after each round
    #: (set from the spec by :func:`fed_tasks.strategies.strategy_for`, like a server
    #: optimizer's hyper-parameters; the clip itself is server state, as the moments are)
    adaptive_clip: AdaptiveClip | None = None

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Strategy:
        return cls()

    def aggregate(self, updates: dict[str, np.ndarray]) -> np.ndarray:
        """The round's aggregate in the layout of a sum (what every party applies)."""
        if not updates:
            raise PayloadError("a round needs at least one update")
        return np.sum([np.asarray(v, dtype=np.float64) for v in updates.values()], axis=0)

    def local_options(self) -> dict[str, Any]:
        """Options of the sites' local training (e.g. FedProx's proximal term)."""
        return {}

    def step(self, weights: np.ndarray, update: SummedUpdate,
             server: dict[str, np.ndarray]) -> np.ndarray:
        """The next global weights from the round's aggregate: the mean Δ, applied as it is
        (a server optimizer keeps its moments in ``server``, which every party holds)."""
        if update.total_weight <= 0:
            raise PayloadError("no site contributed any samples this round")
        return weights + update.mean_delta


def per_site(updates: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(site ids in sorted order, each site's mean Δ as rows, each site's mean loss).

    A robust strategy weighs sites, not rows: a site could claim any row count. A vector
    whose count is not a positive finite number carries no update and is left out."""
    names, deltas, losses = [], [], []
    for name in sorted(updates):
        v = np.asarray(updates[name], dtype=np.float64)
        n = float(v[-1])
        if not np.isfinite(n) or n <= 0 or not np.all(np.isfinite(v)):
            continue
        names.append(name)
        deltas.append(v[:-2] / n)
        losses.append(float(v[-2]) / n)
    if not names:
        raise PayloadError("no update of the round carries a positive row count")
    return names, np.stack(deltas), np.asarray(losses)


def as_sum(delta: np.ndarray, loss: float, k: int) -> np.ndarray:
    """``[k·Δ, k·loss, k]``: an aggregate Δ in the layout every party applies as a sum."""
    return np.concatenate([k * np.asarray(delta, dtype=np.float64), [k * loss, float(k)]])
