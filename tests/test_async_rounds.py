"""Buffered asynchronous rounds (FedBuff): a slow site no longer holds every round back.

Real site code in-process (:func:`datasites.runtime.direct.direct_federation`): the guard,
signatures, each site's verified model state and its checks of every aggregate. The slow
site is a connection whose round-r call does not return until round r + 1 has been released
without it: exactly what a site slower than the rest looks like from the orchestrator.
How much wall time this saves is measured in ``benchmarks/async_rounds.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from datasites.runtime.aggregate_check import AggregateRefused, check_buffered
from datasites.runtime.direct import DirectSite
from datasites.runtime.federation_config import load_site_keys, read_config
from fed_tasks.aggregation import KeyAuthoritySum, MaskedSum
from fed_tasks.interface import SiteConnection
from fed_tasks.messages import AggregateEvidence
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.site_state import SiteModelState
from fed_tasks.site_step import initial_weights
from fed_tasks.spec import JobSpec
from privacy.signing import SignedContribution

ROUNDS = 6


class Lagging(SiteConnection):
    """A site whose *training* of round r ends only once round r + 1 was released.

    The site's own training step blocks (not the connection), so what the site does
    without training stays quick, as at a real slow site: in secagg, masking its late
    update again into a later round."""

    def __init__(self, inner: DirectSite) -> None:
        self.inner, self.name = inner, inner.name
        self.released = 0
        self.changed = threading.Condition()
        self.answered: dict[int, threading.Event] = {}
        privacy = inner.guard.privacy
        train = privacy.run_step

        def slow_step(job, action, given, *args, **kwargs):
            if action == "fit":
                with self.changed:
                    self.changed.wait_for(lambda: self.released > given.round, timeout=120)
            return train(job, action, given, *args, **kwargs)

        privacy.run_step = slow_step

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        if action != "fit":
            return self.inner.call(action, message)
        done = self.answered.setdefault(int(message["round"]), threading.Event())
        try:
            return self.inner.call(action, message)
        finally:
            done.set()

    def on_round(self, rnd: int, _loss: float) -> None:
        """Round ``rnd`` was released: let the training of the round before it end, and
        wait for that call's answer (so the next round's buffer finds it in)."""
        with self.changed:
            self.released = rnd
            self.changed.notify_all()
        if rnd - 1 in self.answered:
            assert self.answered[rnd - 1].wait(120)

    def finish(self) -> None:
        self.on_round(10**6, 0.0)


def _pooled_auc(result, frames, schema) -> float:
    test = pd.concat([te for _, te in frames.values()])
    scores = result.score_samples(test.loc[:, list(schema.features)].to_numpy(float))
    return float(roc_auc_score(test[schema.label].to_numpy(int), scores))


def _train(tmp_path, spec, frames, slow: bool):
    from datasites.runtime.direct import direct_federation, direct_paillier_federation

    authority = None
    if spec.aggregation == "paillier":
        sites, authority, _ = direct_paillier_federation(tmp_path, spec, frames)
    else:
        sites = direct_federation(tmp_path, spec, frames)
    lag = Lagging(sites[-1]) if slow else None
    conns = [*sites[:-1], lag] if lag else sites
    secure = (KeyAuthoritySum(authority) if authority else
              MaskedSum(spec, len(conns)) if spec.aggregation == "secagg" else None)
    trainer = FederatedTrainer(spec, conns, progress=False,
                               on_round=lag.on_round if lag else None, secure_sum=secure)
    try:
        result = trainer.fit()
        if lag:
            lag.finish()
        return result, trainer.evaluate(result)
    finally:
        if lag:
            lag.finish()
        for s in [*sites, *([authority] if authority else [])]:
            s.close()


@pytest.mark.parametrize("mode", ["plain", "paillier", "secagg"])
def test_a_slow_sites_update_joins_a_later_round_and_the_model_stays_as_good(
        tmp_path, schema, four_sites, mode):
    """--async 3 with one slow site of four: each round is formed by the three fast sites
    (and the slow site's stale update when it is in), every site verifies every aggregate
    (stale updates included) and the pooled ROC-AUC stays within 0.01 of the synchronous
    job in which every site answers every round. In paillier the buffer is one sum the key
    authority forms and decrypts, weighing each stale ciphertext itself. In secagg it is
    one masked sum over the sites called: the slow site, recovered for the round it was too
    late for, masks its update again into the round after it finished, weighed by
    itself."""
    base = dict(features=schema.features, label_column=schema.label, rounds=ROUNDS,
                min_sites=3, seed=5, aggregation=mode)
    spec = JobSpec(**base, async_k=3)
    result, rows = _train(tmp_path / "async", spec, four_sites, slow=True)
    assert result.rounds_completed == ROUNDS and np.all(np.isfinite(result.weights))
    by_round: dict[int, dict[str, int]] = {}
    for b in result.buffered:
        by_round.setdefault(b["round"], {})[b["site"]] = b["staleness"]
        assert b["weight"] == pytest.approx((1 + b["staleness"]) ** -0.5, abs=3e-3)
    assert sorted(by_round) == list(range(1, ROUNDS + 1))
    assert all(len(c) >= 3 for c in by_round.values())
    slow = [(r, c["inst-3"]) for r, c in by_round.items() if "inst-3" in c]
    # never fresh: round r's call answers after round r + 1 was released without it
    assert slow and all(stale >= 2 for _, stale in slow), slow
    assert len(slow) < ROUNDS - 1  # it did not hold any round back
    if mode == "secagg":  # recovered for the round it was late for: said, and only that
        assert result.skipped and all(s["site"] == "inst-3" for s in result.skipped)
        assert any("still computing when the round's buffer filled" in s["why"]
                   for s in result.skipped)
    else:
        assert not result.skipped
    assert [r["site"] for r in rows] == list(four_sites)  # every site checked every round

    sync, _ = _train(tmp_path / "sync", JobSpec(**base), four_sites, slow=False)
    buffered, everyone = (_pooled_auc(r, four_sites, schema) for r in (result, sync))
    assert everyone > 0.9  # the synchronous job learnt; the buffered one stays as good
    assert abs(buffered - everyone) <= 0.01, (buffered, everyone)


def test_an_update_too_stale_to_apply_is_dropped_said_and_does_not_fill_the_buffer(
        tmp_path, schema, four_sites):
    """max_staleness 1 and a site whose updates arrive two rounds late: each of them is left
    out and named in the report, and every round still waits for three usable updates."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=4,
                   min_sites=3, seed=5, async_k=3, max_staleness=1)
    result, rows = _train(tmp_path, spec, four_sites, slow=True)
    assert result.rounds_completed == 4
    assert {b["site"] for b in result.buffered} == {"inst-0", "inst-1", "inst-2"}
    dropped = [s for s in result.skipped if s["site"] == "inst-3"]
    assert dropped and all("rounds stale (the job allows 1)" in s["why"] for s in dropped)
    assert all(b["staleness"] <= 1 for b in result.buffered)
    assert len(rows) == 4  # the slow site still catches up and evaluates the final model


# ---- what a site accepts in a buffered aggregate ------------------------------------------
@pytest.fixture()
def members(tmp_path, schema, four_sites):
    """Three member sites with real signing keys, and the checker's model history."""
    from datasites.runtime.direct import direct_federation

    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=8,
                   min_sites=2, async_k=2, max_staleness=2, seed=1)
    frames = dict(list(four_sites.items())[:3])
    sites = direct_federation(tmp_path, spec, frames)
    keys = {s.name: load_site_keys(s.guard.directory, s.name) for s in sites}
    state = SiteModelState.initial(spec, initial_weights(spec))
    state.applied, state.digest = 4, "model-after-4"  # the checker holds aggregate 4
    state.past = {i: f"model-after-{i}" for i in range(2, 5)}
    yield spec, sites, keys, state, read_config(sites[0].guard.directory)
    for s in sites:
        s.close()


def _evidence(spec, keys, updates: dict[str, tuple[int, str]], rnd: int = 5):
    signed = [SignedContribution.create(keys[name].signing_key, name, spec.job_id, slot,
                                        "AAAAAAAAAAA=", model=model).to_str()
              for name, (slot, model) in updates.items()]
    return AggregateEvidence(kind="plain", action="fit", round=rnd, contributions=signed)


def test_a_site_accepts_a_stale_update_only_from_a_model_it_held_and_only_once(members):
    """Aggregate 5 (fit round 5): inst-0 fresh, inst-1 computed for slot 3 (two rounds
    stale, from the model the checker held after aggregate 2). Changing the stale update's
    model, age or history must each be refused."""
    spec, sites, keys, state, config = members
    fresh = ("inst-0", (5, "model-after-4"))
    ok = check_buffered(config, spec, _evidence(spec, keys, dict([fresh, ("inst-2", (
        5, "model-after-4")), ("inst-1", (3, "model-after-2"))])), "inst-0", state)
    assert {n: c.round for n, c in ok.items()} == {"inst-0": 5, "inst-2": 5, "inst-1": 3}
    with pytest.raises(AggregateRefused, match="holds 1 updates of this round, the job "
                                               "needs at least 2"):
        check_buffered(config, spec, _evidence(spec, keys, dict([fresh, ("inst-1", (
            3, "model-after-2"))])), "inst-0", state)  # stale ones only add to fresh ones

    refused = {
        "another model": ("inst-1", (3, "model-after-3")),  # not what slot 3 came from
        "at most 2 rounds stale": ("inst-1", (2, "model-after-1")),
        "cannot join": ("inst-1", (6, "model-after-4")),  # for a later slot
    }
    second = ("inst-2", (5, "model-after-4"))
    for why, stale in refused.items():
        with pytest.raises(AggregateRefused, match=why):
            check_buffered(config, spec, _evidence(spec, keys, dict([fresh, second, stale])),
                           "inst-0", state)
    state.used["inst-1"] = 3  # its slot-3 update was applied in an earlier aggregate
    with pytest.raises(AggregateRefused, match="already applied"):
        check_buffered(config, spec, _evidence(spec, keys, dict([fresh, second, ("inst-1", (
            3, "model-after-2"))])), "inst-0", state)
    forged = _evidence(spec, {**keys, "inst-1": keys["inst-2"]}, dict([fresh, second, (
        "inst-1", (3, "model-after-2"))]))  # signed by another member's key
    with pytest.raises(AggregateRefused, match="not signed by it"):
        check_buffered(config, spec, forged, "inst-0", state)


def test_buffered_rounds_are_averaging_strategies_only(schema):
    base = dict(features=schema.features, label_column=schema.label, min_sites=2)
    with pytest.raises(ValueError, match="does not average"):
        JobSpec(**base, async_k=3, strategy="median")
    with pytest.raises(ValueError, match="not available with differential privacy"):
        JobSpec(**base, async_k=2, dp_epsilon=3.0)
    with pytest.raises(ValueError, match="below min_sites"):
        JobSpec(**base, async_k=1)


@pytest.mark.parametrize("mode", ["plain", "secagg"])
def test_the_owner_reads_in_words_that_rounds_are_buffered_and_what_secagg_gives_up(
        schema, mode):
    """The review an owner approves from says that rounds are buffered and, in secagg, that
    a late site's masked copy is then hidden only by a mask every member can remove."""
    from datasites.governance.review import Review

    spec = JobSpec(features=schema.features, label_column=schema.label, min_sites=2,
                   async_k=2, aggregation=mode)
    words = Review("r1", "inst-0", "ds@x", "pending", "", spec, True).plain_words()
    assert "rounds are buffered: each aggregate is formed once 2 site(s)" in words
    assert ("hidden only by a mask every member can remove" in words) == (mode == "secagg")
