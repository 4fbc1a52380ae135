"""Sites as plain in-memory tables: the centralized and local-only references, and the
syft-free baseline that measures what the datasites cost.

A :class:`LocalSite` follows the same protocol as a real site — it derives its model from
the aggregates it is shown and answers in the plain-mode format — but it is a trusted
simulation: it signs nothing and checks no signature (the datasites do; see
``datasites.runtime.aggregate_check``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fed_tasks import site_step
from fed_tasks.buffered import staleness_in
from fed_tasks.compression import contribution_payload, contribution_vector
from fed_tasks.interface import SiteConnection
from fed_tasks.messages import AggregateEvidence, parse_message
from fed_tasks.schedule import combine
from fed_tasks.selection import candidate_job, validation_split
from fed_tasks.site_state import SiteModelState, aggregate_index
from fed_tasks.spec import JobSpec
from privacy.signing import SignedContribution


def unchecked_sum(spec: JobSpec, evidence: AggregateEvidence) -> np.ndarray:
    """The sum of a plain aggregate's vectors, signatures unchecked (trusted simulation)."""
    length = site_step.vector_length(spec, evidence.action)
    parsed = [SignedContribution.from_str(c) for c in evidence.contributions]
    index = aggregate_index(spec, evidence.action, evidence.round)
    return combine(evidence.action, {c.site_id: contribution_vector(spec, evidence.action,
                                                                    c.payload, length)
                                     for c in parsed}, spec,
                   staleness_in(spec, evidence.action, index,
                                {c.site_id: c.round for c in parsed}))


class LocalSite(SiteConnection):
    """:class:`SiteConnection` that runs the site step directly on frames it holds."""

    def __init__(self, name: str, spec: JobSpec, train: pd.DataFrame, test: pd.DataFrame) -> None:
        self.name = name
        self.spec = spec
        self.train = train
        self.test = test
        self._candidates: dict[int, LocalSite] = {}
        self.held_out: pd.DataFrame | None = None  # a selection candidate's validation rows
        if spec.model != "auto":
            self.model = SiteModelState.initial(spec, site_step.initial_weights(spec))

    def _candidate_call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        """A selection job's call: the named candidate's own site, trained on the rows left
        after the validation split; ``validate`` is its evaluation on the held-out rows."""
        message = dict(message)
        index = message.pop("candidate", None)
        sub = candidate_job(self.spec, index)
        if index not in self._candidates:
            train, held = validation_split(self.spec, self.train)
            self._candidates[index] = type(self)(self.name, sub, train, self.test)
            self._candidates[index].held_out = held
        site = self._candidates[index]
        if action != "validate":
            return site.call(action, message)
        assert site.held_out is not None
        test, site.test = site.test, site.held_out
        try:
            return site.call("evaluate", message)
        finally:
            site.test = test

    def step(self, action: str, given: site_step.StepInput) -> dict[str, Any]:
        """The site step (a subclass may add, e.g., DP)."""
        return site_step.run(self.spec, action, given, self.train, self.test)

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        if self.spec.model == "auto":
            return self._candidate_call(action, message)
        msg = parse_message(action, message)
        previous = getattr(msg, "previous", None)
        for evidence in [*getattr(msg, "catch_up", []), *([previous] if previous else [])]:
            if aggregate_index(self.spec, evidence.action, evidence.round) > self.model.applied:
                self.model.apply(evidence.action, evidence.round,
                                 unchecked_sum(self.spec, evidence))
        rnd = int(getattr(msg, "round", 0))
        result = self.step(action, site_step.StepInput(rnd, self.model.state,
                                                       self.model.private))
        if "vector" not in result:
            return result
        vector = result.pop("vector")
        payload = result.pop("payload", None) or contribution_payload(self.spec, action, vector)
        index = aggregate_index(self.spec, action, rnd)
        return {**result, "contribution": SignedContribution(
            self.name, self.spec.job_id, index, payload, model=self.model.digest).to_str()}
