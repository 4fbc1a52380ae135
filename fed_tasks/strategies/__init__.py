"""How a round's updates become the next model (Flower-style: one strategy, one class).

Every party that forms a round's aggregate — the orchestrator, and each site checking the
signed updates itself — applies the job's strategy (``JobSpec.strategy``) to the same
contributions, so all of them move to the same model. A strategy returns its aggregate in
the layout of a sum, ``[N·Δ, N·loss, N]`` (:mod:`fed_tasks.strategy`), which every party
then applies alike. Strategies that need each site's update in clear (the robust ones)
exist only in plain mode; a secure sum can only add.
"""

from __future__ import annotations

import functools
import importlib

from fed_tasks.spec import JobSpec
from fed_tasks.strategies.base import Strategy

#: ``JobSpec.strategy`` -> "module:Class"
REGISTRY: dict[str, str] = {
    "fedavg": "fed_tasks.strategies.fedavg:FedAvg",
    "fedprox": "fed_tasks.strategies.fedprox:FedProx",
    "median": "fed_tasks.strategies.median:FedMedian",
    "trimmed-mean": "fed_tasks.strategies.trimmed_mean:FedTrimmedAvg",
    "krum": "fed_tasks.strategies.krum:Krum",
    "fedadam": "fed_tasks.strategies.fedadam:FedAdam",
    "fedyogi": "fed_tasks.strategies.fedyogi:FedYogi",
    "scaffold": "fed_tasks.strategies.scaffold:Scaffold",
}


@functools.lru_cache(maxsize=256)
def strategy_for(spec: JobSpec) -> Strategy:
    """The job's strategy, with its parameters from the approved spec (cached per frozen
    spec: every applied round asks; strategies keep no state, the server moments and an
    adaptive DP clip live in the global state)."""
    target = REGISTRY.get(spec.strategy)
    if target is None:
        raise ValueError(f"unknown strategy {spec.strategy!r}; known: {sorted(REGISTRY)}")
    module, cls = target.split(":")
    strategy = getattr(importlib.import_module(module), cls).from_spec(spec)
    if spec.dp_adaptive_clip:  # the clip moves with every applied round, at every party
        from fed_tasks.dp_step import adaptive_clip

        strategy.adaptive_clip = adaptive_clip(spec)
    return strategy
