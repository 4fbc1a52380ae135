"""The loop the data scientist runs: the job's summed phases in order, then evaluation.

The order is the job's schedule (:mod:`fed_tasks.schedule`): statistics, the detector's
phases (training rounds, or moment / histogram sums), the threshold's calibration passes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fed_tasks.aggregation import (
    KeyAuthoritySum,
    MaskedSum,
    PlainSum,
    Released,
    SecureSum,
    TooFewSitesError,
)
from fed_tasks.buffered import WEIGHT_SCALE, staleness_weight, whole_weight
from fed_tasks.checkpoint import Checkpoint, CheckpointError
from fed_tasks.global_state import GlobalState
from fed_tasks.interface import SiteConnection, SiteRefusedError, is_budget_refusal
from fed_tasks.preprocessing import Standardizer
from fed_tasks.schedule import phases, training_done, vector_length
from fed_tasks.site_step import detector, initial_weights
from fed_tasks.spec import JobSpec
from fed_tasks.strategies import strategy_for

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """The released global model and what the data scientist may see of its training."""

    spec: JobSpec
    weights: np.ndarray
    norm: Standardizer
    losses: list[float] = field(default_factory=list)  # NaN where DP sites withheld the loss
    round_seconds: list[float] = field(default_factory=list)
    release_seconds: float = 0.0  # a secure sum's last call: the sites open the last round
    stopped_early: bool = False  # a site refused a round: its privacy budget would overspend
    stop_reason: str = ""
    state: GlobalState | None = None  # everything released (sums kept for the detector)
    # model="auto": each candidate's pooled validation ROC-AUC and per-site metrics; the
    # result itself is the chosen candidate's (``spec`` is its derived spec)
    selection: list[dict[str, Any]] | None = None
    # sites left out of a call: {"action", "round", "site", "why"} (not selected for the
    # round, no answer within round_timeout, a secure-sum dropout)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # buffered rounds (spec.async_k): each round's contributors, {"round", "site",
    # "staleness", "weight"}: a stale update weighs (1 + staleness)^-1/2
    buffered: list[dict[str, Any]] = field(default_factory=list)
    # each site's training-round contribution as it left the site: {"round", "site", "bytes",
    # "clipped"} (the signed string's size; values clipped to the encoding's bound)
    sent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bytes_per_site_round(self) -> float | None:
        """Mean size in bytes of one site's contribution to one training round."""
        return float(np.mean([s["bytes"] for s in self.sent])) if self.sent else None

    @property
    def rounds_completed(self) -> int:
        """Rounds whose aggregate is in :attr:`weights` (< ``spec.rounds`` if stopped early)."""
        return len(self.losses)

    @property
    def converged(self) -> bool:
        """Training stopped before ``spec.rounds`` because the loss stopped improving."""
        return not self.stop_reason and training_done(self.spec, self.losses)

    def _state(self) -> GlobalState:
        return self.state or GlobalState(self.weights, self.norm)

    def model(self):
        """The trained detector, ready for ``score_samples`` on standardized rows."""
        return detector(self.spec, self._state())

    @property
    def threshold(self) -> float | None:
        """The calibrated alarm threshold on :meth:`score_samples` (None if not calibrated)."""
        return self.model().threshold_

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores (higher = more anomalous) of raw feature rows."""
        return self.model().score_samples(self.norm.transform(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """1 (alarm) where a raw row's score exceeds the calibrated threshold, else 0."""
        return self.model().predict(self.norm.transform(x))


class FederatedTrainer:
    """Runs one approved job across sites: moments → the detector's phases (for a neural
    detector ``spec.rounds`` FedAvg rounds) → the threshold's calibration.

    Sites are called concurrently; the trainer only ever uses the *sums* of their
    contributions, released by ``secure_sum`` (see :mod:`fed_tasks.aggregation`).
    """

    def __init__(self, spec: JobSpec, sites: Sequence[SiteConnection],
                 progress: bool = True,
                 on_round: Callable[[int, float], None] | None = None,
                 secure_sum: SecureSum | None = None) -> None:
        if not sites:
            raise ValueError("a federated job needs at least one site")
        self.spec = spec
        self.sites = list(sites)
        self.strategy = strategy_for(spec) if spec.model != "auto" else None
        self.progress = progress
        self.on_round = on_round
        if secure_sum is None and spec.aggregation != "plain":
            raise ValueError(f"a {spec.aggregation!r} job needs its secure_sum")
        self.secure_sum = secure_sum or PlainSum(spec.min_sites)
        if isinstance(self.secure_sum, PlainSum):  # the sites combine rounds by the spec's
            self.secure_sum.spec = spec  # strategy; the orchestrator must do the same
        if hasattr(self.secure_sum, "timeout"):
            self.secure_sum.timeout = spec.round_timeout
        if spec.async_k is not None:
            if not isinstance(self.secure_sum, PlainSum | KeyAuthoritySum | MaskedSum):
                raise ValueError("buffered rounds (async_k) need the job's own secure sum")
            self.secure_sum.spec = spec
            if spec.async_k > len(self.sites):
                raise ValueError(f"async_k={spec.async_k} exceeds the {len(self.sites)} sites: "
                                 "a round could never fill its buffer")
            self.secure_sum.buffer_k = spec.async_k
        self.buffered: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []  # TrainingResult.sent
        self._chosen: FederatedTrainer | None = None  # model="auto": the winner's trainer

    def _submit(self, action: str, message: dict[str, Any]) -> list[Released]:
        rnd = int(message.get("round", 0))
        called = self._selected(rnd) if action == "fit" else self.sites
        for site in self.sites:
            if site not in called:
                self.skipped.append({"action": action, "round": rnd, "site": site.name,
                                     "why": "not selected for this round"})
        try:
            released = self.secure_sum.submit(called, action, message,
                                               vector_length(self.spec, action))
            if action == "fit":
                self.sent += [{"round": rnd, "site": name, **sizes} for name, sizes
                              in sorted((getattr(self.secure_sum, "sent", None) or {}).items())]
            return released
        finally:
            if action == "fit" and self.spec.async_k is not None:
                for name, stale in sorted(getattr(self.secure_sum, "last_staleness",
                                                  {}).items()):
                    weight = (whole_weight(stale) / WEIGHT_SCALE  # what the authority used
                              if self.spec.aggregation == "paillier" else staleness_weight(stale))
                    self.buffered.append({"round": rnd, "site": name, "staleness": stale,
                                          "weight": round(weight, 4)})
                self.secure_sum.last_staleness = {}
            for name, why in (getattr(self.secure_sum, "last_skipped", None) or {}).items():
                self.skipped.append({"action": action, "round": rnd, "site": name, "why": why})
                log.warning("job %s %s %d: site %s skipped: %s", self.spec.job_id, action,
                            rnd, name, why)

    def _selected(self, rnd: int) -> list[SiteConnection]:
        """The sites a training round calls: all, or a fraction drawn from the public seed
        and the round (at least ``min_sites``), in site order."""
        if self.spec.fraction >= 1.0:
            return self.sites
        k = min(len(self.sites), max(self.spec.min_sites,
                                     math.ceil(self.spec.fraction * len(self.sites))))
        rng = np.random.default_rng([self.spec.seed, rnd])
        chosen = set(rng.choice(len(self.sites), size=k, replace=False).tolist())
        return [s for i, s in enumerate(self.sites) if i in chosen]

    def standardizer(self) -> Standardizer:
        """Global feature scaling from the summed site moments."""
        state = GlobalState(initial_weights(self.spec))
        for rel in self._submit("stats", {}) + self.secure_sum.finish(self.sites):
            state.advance(rel.action, rel.vector, rnd=rel.round)
        if state.norm is None:
            raise TooFewSitesError("no site released its feature statistics")
        return state.norm

    def fit(self, checkpoint: Path | None = None, resume: bool = False) -> TrainingResult:
        """Run the rounds; returns the released model.

        With ``checkpoint``, the released sums and the last aggregate's evidence are saved
        there after every round; ``resume=True`` replays a saved checkpoint (the model is
        rebuilt exactly from its sums) and continues with the next round. The sites keep
        their own state, and answer a retried round with the reply they already gave.

        If a site refuses a round because it would overspend a dataset's privacy budget, the
        job stops cleanly: the result holds the model of the last completed round, with
        ``stopped_early=True`` and the site's reason in ``stop_reason``. Any other refusal
        or failure raises.
        """
        if self.spec.model == "auto":  # no checkpoint yet: a crash means a new job
            if resume:
                raise CheckpointError("a model-selection job cannot resume yet; submit it "
                                      "again")
            return self._select()
        state = GlobalState(initial_weights(self.spec))
        saved = Checkpoint.new(self.spec)
        if resume:
            if checkpoint is None or not checkpoint.exists():
                raise CheckpointError(f"job {self.spec.job_id} has no checkpoint to resume "
                                      f"from ({checkpoint})")
            saved = Checkpoint.load(checkpoint, self.spec)
            self.secure_sum.restore(saved.evidence, saved.session)
        losses: list[float] = []
        seconds: list[float] = list(saved.round_seconds)
        stop_reason = ""
        todo = [(p.action, k) for p in phases(self.spec)[1:] for k in range(1, p.count + 1)]
        left = [c for c in todo if not saved.done(*c)]
        bar = tqdm(left, desc=f"job {self.spec.job_id}", unit="call", disable=not self.progress,
                   initial=len(todo) - len(left), total=len(todo))

        def take(released: list[Released], record: bool = True) -> None:
            for rel in released:  # a secure sum releases each round's sum one call later
                state.advance(rel.action, rel.vector, self.strategy, rnd=rel.round)
                if record:
                    saved.released.append((rel.action, rel.round, rel.vector))
                if rel.action != "fit":
                    continue
                loss = math.nan if self.spec.dp_enabled else state.loss  # DP: loss withheld
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.on_round and record:
                    self.on_round(rel.round, loss)

        def save() -> None:
            if checkpoint is not None:
                saved.evidence = self.secure_sum.evidence()
                saved.session = self.secure_sum.session_state()
                saved.round_seconds = seconds
                saved.save(checkpoint)

        take([Released(a, r, v) for a, r, v in saved.released], record=False)
        if not saved.has_stats:
            take(self._submit("stats", {}))
            save()
        for action, rnd in bar:
            if action == "fit" and training_done(self.spec, losses):
                continue  # early stopping: the rounds are a maximum (schedule.may_follow)
            bar.set_description(f"job {self.spec.job_id} {action}")
            started = time.perf_counter()
            try:
                take(self._submit(action, {"round": rnd,
                                           "previous": self.secure_sum.evidence()}))
            except (SiteRefusedError, TooFewSitesError) as exc:
                if not is_budget_refusal(exc):
                    raise
                stop_reason = str(exc)
                log.warning("job %s stopped before %s %d: %s", self.spec.job_id, action, rnd,
                            exc)
                bar.set_postfix_str("stopped: privacy budget")
                break
            finally:
                if action == "fit":
                    seconds.append(time.perf_counter() - started)
            save()
        started = time.perf_counter()
        try:
            take(self.secure_sum.finish(self.sites))
        except (SiteRefusedError, TooFewSitesError) as exc:
            if not stop_reason:
                raise
            log.warning("job %s: the last round's sum stays sealed: %s", self.spec.job_id, exc)
        release = time.perf_counter() - started
        bar.close()
        if state.norm is None:
            raise TooFewSitesError(f"job {self.spec.job_id}: no aggregate was released "
                                   f"({stop_reason or 'no site answered'})")
        return TrainingResult(self.spec, state.weights, state.norm, losses, seconds, release,
                              stopped_early=bool(stop_reason), stop_reason=stop_reason,
                              state=state, skipped=list(self.skipped),
                              buffered=list(self.buffered), sent=list(self.sent))

    def _select(self) -> TrainingResult:
        """model="auto": every candidate trained and validated; the best one's result."""
        from fed_tasks.selection import best, select

        def make(sub: JobSpec, conns: list, secure_sum: SecureSum) -> FederatedTrainer:
            return FederatedTrainer(sub, conns, progress=self.progress, secure_sum=secure_sum)

        candidates = select(self.spec, self.sites, self.secure_sum, make)
        chosen = best(candidates)
        self._chosen = chosen.trainer
        chosen.result.selection = [{"model": c.model, "validation_roc_auc": c.auc,
                                    "chosen": c is chosen, "per_site": c.validation}
                                   for c in candidates]
        return chosen.result

    def evaluate(self, result: TrainingResult) -> list[dict[str, Any]]:
        """Each site's metrics of the final model on its private test split.

        A site evaluates only the model it derived itself; the message carries the evidence
        of the last aggregate, in case the site has not applied it yet."""
        if self._chosen is not None:
            return self._chosen.evaluate(result)
        # each site first applies the aggregates it missed (a site out of a synchronous
        # secure sum for good is not called)
        replies = self.secure_sum.call_sites(self.sites, "evaluate",
                                             {"previous": self.secure_sum.evidence()})
        return [{"site": s.name, **replies[s.name]} for s in self.sites if s.name in replies]
