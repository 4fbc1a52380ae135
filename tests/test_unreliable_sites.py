"""Sites that stall or are left out of a round: the job goes on, and says who missed what.

Real site code in-process (:func:`datasites.runtime.direct.direct_federation`: the guard,
the audit log, the site's verified model state, signatures, the secure sum). A stalling
site is a connection whose round-2 call does not return until the test lets it: exactly
what a slow institution looks like from the orchestrator.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from datasites.governance.audit import Action
from fed_tasks.aggregation import MaskedSum
from fed_tasks.interface import SiteConnection, SiteRefusedError
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec
from privacy.signing import SignedContribution

TIMEOUT = 10.0  # seconds a round waits; a round of these sites takes well under one


class Stalling(SiteConnection):
    """Holds its call of training round ``rnd`` until ``release`` is set."""

    def __init__(self, inner: SiteConnection, rnd: int) -> None:
        self.inner, self.rnd, self.name = inner, rnd, inner.name
        self.release, self.answered = threading.Event(), threading.Event()

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        if action == "fit" and message.get("round") == self.rnd:
            self.release.wait(120)
            try:
                return self.inner.call(action, message)
            finally:
                self.answered.set()
        return self.inner.call(action, message)


def _sites(tmp_path, spec, frames) -> list:
    from datasites.runtime.direct import direct_federation

    return direct_federation(tmp_path, spec, frames)


def _contributors(evidence: dict[str, Any]) -> list[str]:
    signed = evidence["contributions"] or evidence["inputs"]
    return sorted(SignedContribution.from_str(c).site_id for c in signed)


@pytest.mark.parametrize("mode", ["plain", "secagg"])
def test_a_stalled_site_is_skipped_for_its_round_and_the_job_finishes(tmp_path, schema,
                                                                       four_sites, mode):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=4,
                   aggregation=mode, min_sites=3, round_timeout=TIMEOUT, seed=5)
    sites = _sites(tmp_path, spec, four_sites)
    slow = Stalling(sites[3], rnd=2)
    conns = [*sites[:3], slow]

    def after(rnd: int, _loss: float) -> None:
        if rnd == 2:  # the slow site answers late, after the round went on without it
            slow.release.set()
            assert slow.answered.wait(60)

    secure = MaskedSum(spec, len(conns)) if mode == "secagg" else None
    trainer = FederatedTrainer(spec, conns, progress=False, on_round=after, secure_sum=secure)
    try:
        result = trainer.fit()
        assert result.rounds_completed == 4 and np.all(np.isfinite(result.weights))
        missed = [(s["round"], s["site"]) for s in result.skipped]
        assert missed[0] == (2, "inst-3") and "did not answer fit within" in \
            result.skipped[0]["why"]
        if mode == "plain":  # caught up on aggregate 2, it trains round 3 and 4 again
            assert missed == [(2, "inst-3")]
            assert _contributors(trainer.secure_sum.evidence()) == sorted(four_sites)
            rows = trainer.evaluate(result)
            assert [r["site"] for r in rows] == list(four_sites)  # its model caught up too
        else:  # a secure-sum dropout stays out: the others finish the job
            assert missed == [(2, "inst-3"), (3, "inst-3"), (4, "inst-3")]
            assert "dropped" in result.skipped[-1]["why"]
            rows = trainer.evaluate(result)
            assert [r["site"] for r in rows] == list(four_sites)[:3]
        ranked = [r["roc_auc"] for r in rows if r["roc_auc"] is not None]  # two classes
        assert ranked and all(0.5 < v <= 1 for v in ranked)
    finally:
        slow.release.set()
        for s in sites:
            s.close()


def test_a_fraction_of_sites_per_round_and_every_site_follows_the_same_model(
        tmp_path, schema, four_sites):
    """Half the sites a round (at least min_sites): a site left out applies the aggregates
    it missed, checked like any other, at its next call; the draw is public and seeded."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=5,
                   fraction=0.5, min_sites=2, seed=7)
    sites = _sites(tmp_path, spec, four_sites)
    trainer = FederatedTrainer(spec, sites, progress=False)
    try:
        result = trainer.fit()
        assert result.rounds_completed == 5
        out = [(s["round"], s["site"]) for s in result.skipped]
        assert len(out) == 5 * 2 and all(s["why"] == "not selected for this round"
                                         for s in result.skipped)
        assert len({site for _, site in out}) > 1  # the draw changes with the round
        again = FederatedTrainer(spec, sites, progress=False)
        assert [again._selected(r) for r in range(1, 6)] == \
            [trainer._selected(r) for r in range(1, 6)]
        for rnd in range(1, 6):  # each site computed only the rounds it was called for
            called = {s.name for s in trainer._selected(rnd)}
            assert {site for r, site in out if r == rnd} == set(four_sites) - called
        rows = trainer.evaluate(result)  # every site catches up to the released model
        assert [r["site"] for r in rows] == list(four_sites)
        ranked = [r["roc_auc"] for r in rows if r["roc_auc"] is not None]  # two classes
        assert ranked and all(0.5 < v <= 1 for v in ranked)
        for site in sites:
            fits = [e for e in site.guard.audit.entries(action=Action.FUNCTION_EXECUTED)
                    if (e.get("params") or {}).get("action") == "fit"]
            chosen = sum(site.name in {s.name for s in trainer._selected(r)}
                         for r in range(1, 6))
            assert len(fits) == chosen, site.name  # approvals counted only where called
    finally:
        for s in sites:
            s.close()


def test_a_secure_sum_job_refuses_a_fraction_of_sites():
    with pytest.raises(ValueError, match="fraction < 1 needs aggregation"):
        JobSpec(features=("a", "b"), aggregation="secagg", fraction=0.5)


def test_a_site_refuses_a_call_whose_missed_aggregates_are_not_all_relayed(
        tmp_path, schema, four_sites):
    """The orchestrator cannot make a site skip an aggregate: without the evidence of each
    one it missed, the site holds an older model and refuses the round."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=4,
                   fraction=0.5, min_sites=2, seed=7)
    sites = _sites(tmp_path, spec, four_sites)
    trainer = FederatedTrainer(spec, sites, progress=False)
    try:
        trainer.fit()
        history = trainer.secure_sum._history
        behind = [s for s in sites if s not in trainer._selected(4)]  # missed aggregate 3+
        assert behind
        with pytest.raises(SiteRefusedError, match="not the next one"):
            behind[0].call("evaluate", {"previous": history[-1]})  # catch-up withheld
        reply = behind[0].call("evaluate", {"previous": history[-1],
                                            "catch_up": history[-3:-1]})
        # with every missed aggregate relayed it follows the federation's model again
        assert reply["n_test"] > 0 and (reply["roc_auc"] is None or reply["roc_auc"] > 0.5)
    finally:
        for s in sites:
            s.close()


class _Crash(Exception):
    pass


def test_a_resumed_job_still_catches_up_the_sites_left_out_before_the_crash(
        tmp_path, schema, four_sites):
    """The checkpoint keeps the aggregates some site was not sent yet: after a crash of the
    data scientist's process, a new trainer relays them, and the model equals an
    uninterrupted run's."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=5,
                   fraction=0.5, min_sites=2, seed=11)

    def crash(rnd: int, _loss: float) -> None:
        if rnd == 3:
            raise _Crash

    reference = _sites(tmp_path / "b", spec, four_sites)
    try:
        expected = FederatedTrainer(spec, reference, progress=False).fit()
    finally:
        for s in reference:
            s.close()
    sites = _sites(tmp_path / "a", spec, four_sites)
    checkpoint = tmp_path / "checkpoint.json"
    try:
        with pytest.raises(_Crash):
            FederatedTrainer(spec, sites, progress=False, on_round=crash).fit(checkpoint)
        trainer = FederatedTrainer(spec, sites, progress=False)
        result = trainer.fit(checkpoint, resume=True)
        np.testing.assert_allclose(result.weights, expected.weights, atol=1e-6)
        assert [r["site"] for r in trainer.evaluate(result)] == list(four_sites)
    finally:
        for s in sites:
            s.close()
