"""The round loop the data scientist runs: statistics, training rounds, evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fed_tasks.aggregation import PlainSum, SecureSum
from fed_tasks.codec import encode_array
from fed_tasks.interface import SiteConnection, call_all
from fed_tasks.preprocessing import Moments, Standardizer
from fed_tasks.site_step import new_model, vector_length
from fed_tasks.spec import JobSpec
from fed_tasks.strategy import FedAvg, SummedUpdate


@dataclass
class TrainingResult:
    """The released global model and what the data scientist may see of its training."""

    spec: JobSpec
    weights: np.ndarray
    norm: Standardizer
    losses: list[float] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)

    def model(self):
        """The trained detector, ready for ``score_samples`` on standardized rows."""
        model = new_model(self.spec)
        model.set_weights(self.weights)
        return model

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores (higher = more anomalous) of raw feature rows."""
        return self.model().score_samples(self.norm.transform(x))


class FederatedTrainer:
    """Runs one approved job across sites: moments → ``spec.rounds`` FedAvg rounds.

    Sites are called concurrently; the trainer only ever uses the *sum* of their
    contributions, obtained through ``secure_sum`` (see :mod:`fed_tasks.aggregation`).
    """

    def __init__(self, spec: JobSpec, sites: Sequence[SiteConnection],
                 strategy: FedAvg | None = None, progress: bool = True,
                 on_round: Callable[[int, float], None] | None = None,
                 secure_sum: SecureSum | None = None) -> None:
        if not sites:
            raise ValueError("a federated job needs at least one site")
        self.spec = spec
        self.sites = list(sites)
        self.strategy = strategy or FedAvg()
        self.progress = progress
        self.on_round = on_round
        if secure_sum is None and spec.aggregation != "plain":
            raise ValueError(f"a {spec.aggregation!r} job needs its secure_sum")
        self.secure_sum = secure_sum or PlainSum()

    def _sum(self, action: str, message: dict[str, Any]) -> np.ndarray:
        return self.secure_sum.sum(self.sites, action, message, vector_length(self.spec, action))

    def standardizer(self) -> Standardizer:
        """Global feature scaling from the summed site moments."""
        return Standardizer.from_moments(Moments.from_vector(self._sum("stats", {})))

    def fit(self) -> TrainingResult:
        norm = self.standardizer()
        weights = new_model(self.spec).get_weights()
        result = TrainingResult(self.spec, weights, norm)
        bar = tqdm(range(1, self.spec.rounds + 1), desc=f"job {self.spec.job_id}", unit="round",
                   disable=not self.progress)
        for rnd in bar:
            started = time.perf_counter()
            message = {"round": rnd, "weights": encode_array(weights), "norm": norm.to_dict()}
            summed = SummedUpdate(self._sum("fit", message))
            weights = self.strategy.aggregate(weights, summed)
            result.weights = weights
            result.losses.append(summed.mean_loss)
            result.round_seconds.append(time.perf_counter() - started)
            bar.set_postfix(loss=f"{summed.mean_loss:.4f}")
            if self.on_round:
                self.on_round(rnd, summed.mean_loss)
        return result

    def evaluate(self, result: TrainingResult) -> list[dict[str, Any]]:
        """Each site's metrics of the final model on its private test split."""
        message = {"weights": encode_array(result.weights), "norm": result.norm.to_dict()}
        return [{"site": s.name, **r} for s, r in
                zip(self.sites, call_all(self.sites, "evaluate", message), strict=True)]
