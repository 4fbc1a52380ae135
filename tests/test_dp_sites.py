"""Differential privacy through real datasites: what a site returns, what it charges, and
how a job ends when a dataset's budget runs out (also across a site restart).

This module starts the suite's one extra small federation (two sites, no key authority), so
that spending privacy budget and restarting a site leave the session federation untouched.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from datasites.governance.accounts import Role
from datasites.governance.audit import Action
from datasites.governance.policy import DatasetPolicy
from datasites.runtime.direct import direct_federation
from datasites.runtime.tables import make_mock
from fed_tasks import dp_step
from fed_tasks.codec import decode_array
from fed_tasks.global_state import GlobalState
from fed_tasks.interface import BUDGET_EXHAUSTED, SiteRefusedError
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.preprocessing import Moments, Standardizer
from fed_tasks.site_step import new_model, vector_length
from fed_tasks.spec import JobSpec
from fed_tasks.strategies.fedavg import FedAvg
from privacy.signing import SignedContribution

NAMES = ("ward-a", "ward-b")


@pytest.fixture(scope="module")
def small_fed(partitions, schema, tmp_path_factory):
    from datasites.harness.federation import Federation

    fed = Federation.start(partitions[:2], schema, root=tmp_path_factory.mktemp("dp-fed"),
                           names=NAMES, key_authority=False)
    for site in fed.sites:  # the ledger tests run client-level DP that swamps 2 sites' signal
        site.set_policy(noisy_dp="warn", reason="ledger tests: noise-swamped jobs allowed")
    yield fed
    fed.close()


def _spec(schema, **kw) -> JobSpec:
    return JobSpec(features=schema.features, label_column=schema.label, **kw)


def _fit_message(spec, rnd=1):
    """A round message without evidence: refused for the budget before it is even read."""
    return {"round": rnd}


def _payload(reply, spec, action):
    return decode_array(SignedContribution.from_str(reply["contribution"]).payload,
                        vector_length(spec, action))


def _with_room(site, epsilon: float) -> None:
    """Owner sets the budget so that exactly ``epsilon`` is left."""
    site.set_policy(epsilon_budget=site.guard.privacy.ledger.spent("records") + epsilon,
                    reason="test budget")


def test_dp_site_returns_a_clipped_noised_update_and_mock_statistics(small_fed, schema,
                                                                     partitions):
    site, session = small_fed.sites[0], small_fed.sessions()[0]
    clip = 1e-3  # far below the unclipped update's norm, so clipping bites
    spec = _spec(schema, rounds=1, dp_epsilon=1000.0, dp_clip=clip)
    for other, sess in zip(small_fed.sites, small_fed.sessions(), strict=True):
        _with_room(other, 2000.0)
        other.approve(sess.submit(spec))
    conns = small_fed.connections(spec)
    replies = [c.call("stats", {}) for c in conns]
    stats = _payload(replies[0], spec, "stats")
    mock = session.mock("train").loc[:, list(spec.features)].to_numpy(float)
    np.testing.assert_allclose(stats, Moments.of(mock).to_vector())  # the public mock only
    evidence = {"kind": "plain", "action": "stats", "round": 0,
                "contributions": [r["contribution"] for r in replies]}
    vec = _payload(conns[0].call("fit", {"round": 1, "previous": evidence}), spec, "fit")
    assert vec[-2] == 0.0 and vec[-1] == 1.0  # loss withheld, unit weight
    z = dp_step.client_plan(spec).noise_multiplier  # plain mode: this site adds all the noise
    bound = clip + z * clip * (math.sqrt(len(vec) - 2) + 8)
    assert bound < 3 * clip and np.linalg.norm(vec[:-2]) <= bound
    from fed_tasks import site_step  # the same round without DP moves much further

    state = GlobalState(new_model(spec).get_weights(),
                        Standardizer.from_moments(Moments.from_vector(stats)))
    raw = site_step.run(_spec(schema, rounds=1), "fit", site_step.StepInput(1, state),
                        partitions[0][0], partitions[0][1])["vector"]
    assert np.linalg.norm(raw[:-2] / raw[-1]) > 20 * bound
    charged = site.guard.audit.entries(action=Action.BUDGET_CHARGED)[-1]
    assert charged["objects"]["job_id"] == spec.job_id
    assert charged["params"]["epsilon"] == pytest.approx(dp_step.cumulative_epsilon(spec, 1))


class _Recording(FedAvg):
    """FedAvg that remembers each round's aggregate, to check which model is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.models: list[np.ndarray] = []

    def step(self, weights, update, server):
        out = super().step(weights, update, server)
        self.models.append(out)
        return out


def test_budget_runs_out_the_job_stops_cleanly_and_the_ledger_survives_a_restart(
        small_fed, schema):
    from datasites.adapter.scientist import ScientistSession
    from datasites.runtime.datasite import Datasite

    site = small_fed.sites[0]
    spec = _spec(schema, rounds=4, dp_epsilon=3.0, dp_clip=0.5)
    cum = [dp_step.cumulative_epsilon(spec, k) for k in range(5)]
    for s in small_fed.sites:
        _with_room(s, 3.0)
    small_fed.approve_all(small_fed.submit(spec))
    # the owner of ward-a then lowers the budget: room for two of the four rounds
    _with_room(site, cum[2] + 0.5 * (cum[3] - cum[2]))
    spent_before = site.guard.privacy.ledger.spent("records")
    strategy = _Recording()
    trainer = FederatedTrainer(spec, small_fed.connections(spec), progress=False)
    trainer.strategy = strategy  # the orchestrator's own copy of the round rule
    result = trainer.fit()
    assert result.stopped_early and result.rounds_completed == 2
    assert BUDGET_EXHAUSTED in result.stop_reason and "ward-a" in result.stop_reason
    assert len(strategy.models) == 2 and np.array_equal(result.weights, strategy.models[-1])
    assert all(math.isnan(v) for v in result.losses)  # DP sites withhold the loss
    metrics = trainer.evaluate(result)  # the partial model is evaluated like a finished one
    assert len(metrics) == 2 and all(0.0 <= m["roc_auc"] <= 1.0 for m in metrics)
    ledger = site.guard.privacy.ledger
    assert ledger.job("records", spec.job_id)["epsilon"] == pytest.approx(cum[2])
    assert ledger.spent("records") - spent_before == pytest.approx(cum[2])
    assert ledger.spent("records") <= site.policy().epsilon_budget
    from datasites.harness.demo import privacy_report  # what `fedsyft demo --report` says

    report = privacy_report(spec, small_fed.sites, result.rounds_completed)
    per_site = report["epsilon_spent_per_site"]
    assert report["epsilon_spent"] == max(per_site.values()) and report["delta"] == 1e-5
    assert per_site["ward-a"] == pytest.approx(cum[2])
    assert report["epsilon_accountant"] == pytest.approx(cum[2])  # the rounds in the model
    conn = small_fed.connections(spec)[0]
    with pytest.raises(SiteRefusedError, match=BUDGET_EXHAUSTED):
        conn.call("fit", _fit_message(spec, 3))
    refused = site.guard.audit.entries(action=Action.CALL_REFUSED)[-1]
    assert BUDGET_EXHAUSTED in refused["params"]["reason"]

    # restart: the reopened site reads the same ledger and policy from its directory
    spent, budget = ledger.spent("records"), site.policy().epsilon_budget
    owner = site.accounts[Role.DATA_OWNER]
    site.close()
    reopened = Datasite.open(site.directory, owner.email, owner.password)
    small_fed.sites[0] = reopened  # the fixture closes it
    small_fed._sessions = None
    assert reopened.guard.privacy.ledger.spent("records") == pytest.approx(spent)
    assert reopened.policy().epsilon_budget == budget
    session = ScientistSession(reopened.login(small_fed.scientist.email,
                                              small_fed.scientist.password))
    with pytest.raises(SiteRefusedError, match=BUDGET_EXHAUSTED):
        session.connection(spec).call("fit", _fit_message(spec, 3))
    more = _spec(schema, rounds=2, dp_epsilon=1.0)  # more than the little that is left
    rid = session.submit(more)
    with pytest.raises(PermissionError, match="remaining privacy budget"):
        reopened.approve(rid)


def test_dp_sgd_is_charged_like_the_accountant_says(tmp_path, partitions, schema):
    """Sample-level DP-SGD through the real site entry point (no syft transport)."""
    spec = _spec(schema, rounds=2, dp_epsilon=2.0, dp_sgd=True, trim=0.0, batch_size=128,
                 local_epochs=1)
    frames = {f"dpsgd-{i}": p for i, p in enumerate(partitions[:2])}
    sites = direct_federation(tmp_path, spec, frames)
    try:
        for s, (train, test) in zip(sites, frames.values(), strict=True):
            s.guard.register_assets({"train": train, "test": test},
                                    {"train": make_mock(train, schema), "test": test})
        result = FederatedTrainer(spec, sites, progress=False).fit()
        assert result.rounds_completed == 2 and not result.stopped_early
        for s, (train, _) in zip(sites, frames.values(), strict=True):
            job = s.guard.privacy.ledger.job("records", spec.job_id)
            plan = dp_step.sgd_plan(spec, len(train))
            assert job["kind"] == "dp_sgd" and job["releases"] == 2
            assert job["noise_multiplier"] == plan.noise_multiplier
            assert sum(job["charges"]) == pytest.approx(plan.epsilon_total, rel=1e-9)
            assert plan.epsilon_total <= 2.0
    finally:
        for s in sites:
            s.close()


def _secure_sum_sites(tmp_path, spec, partitions, schema, prefix):
    """Three in-process sites with published mocks (DP statistics come from them), and a
    trainer wired to the job's secure sum."""
    from fed_tasks.aggregation import MaskedSum

    frames = {f"{prefix}-{i}": p for i, p in enumerate(partitions)}
    sites = direct_federation(tmp_path, spec, frames)
    for s, (train, test) in zip(sites, frames.values(), strict=True):
        s.guard.register_assets({"train": train, "test": test},
                                {"train": make_mock(train, schema), "test": test})
        privacy = s.guard.privacy  # these tests are about the ledger, not the model's use
        privacy.set_policy(privacy.policy().model_copy(update={"noisy_dp": "warn"}),
                           "owner@direct.site", "ledger tests: noise-swamped jobs allowed")
    return sites, FederatedTrainer(spec, sites, progress=False,
                                   secure_sum=MaskedSum(spec, len(sites)))


def test_dp_composes_with_secure_sum(tmp_path, partitions, schema):
    """Each site's noise share is sized by the smallest sum the secure sum can reveal."""
    spec = _spec(schema, rounds=2, dp_epsilon=8.0, dp_clip=0.5, aggregation="secagg",
                 min_sites=2)
    sites, trainer = _secure_sum_sites(tmp_path, spec, partitions, schema, "secdp")
    try:
        assert sites[0].guard.privacy._secure_floor(spec) == 2  # threshold of 3 sites
        result = trainer.fit()
        assert result.rounds_completed == 2
        assert np.all(np.isfinite(result.weights))
        for s in sites:
            assert s.guard.privacy.job_epsilon(spec.job_id) == pytest.approx(
                dp_step.cumulative_epsilon(spec, 2))
    finally:
        for s in sites:
            s.close()


def test_policy_is_default_at_new_sites(small_fed):
    assert small_fed.sites[1].policy().max_rounds == DatasetPolicy().max_rounds


def test_secure_sum_job_stops_cleanly_when_budgets_run_out(tmp_path, partitions, schema):
    """Every site refuses round 3 (budget): the sites already opened round 1, and the last
    call opens round 2, so the job returns round 2's model, charged for two rounds."""
    spec = _spec(schema, rounds=4, dp_epsilon=3.0, dp_clip=0.5, aggregation="secagg",
                 min_sites=2)
    cum = [dp_step.cumulative_epsilon(spec, k) for k in range(5)]
    sites, trainer = _secure_sum_sites(tmp_path, spec, partitions, schema, "stop")
    try:
        for s in sites:
            privacy = s.guard.privacy
            privacy.set_policy(privacy.policy().model_copy(
                update={"epsilon_budget": cum[2] + 0.5 * (cum[3] - cum[2])}),
                "owner@direct.site", "test budget")
        result = trainer.fit()
        assert result.stopped_early and result.rounds_completed == 2
        assert BUDGET_EXHAUSTED in result.stop_reason
        assert np.all(np.isfinite(result.weights)) and result.release_seconds > 0
        assert not np.array_equal(result.weights, new_model(spec).get_weights())
        for s in sites:
            assert s.guard.privacy.job_epsilon(spec.job_id) == pytest.approx(cum[2])
            used = s.guard.approval(spec.job_id)["used"]
            assert used["fit"] == 2 and used["secagg_reveal"] == 1
        assert len(trainer.evaluate(result)) == 3
    finally:
        for s in sites:
            s.close()
