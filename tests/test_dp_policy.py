"""DP in the site step, the job's accounting, the ledger and the policy, without syft."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from datasites.governance.ledger import BudgetExceeded, PrivacyLedger
from datasites.governance.policy import DatasetPolicy, PolicyStore, Requester, Submitter
from fed_tasks import dp_step, site_step
from fed_tasks.global_state import GlobalState
from fed_tasks.interface import BUDGET_EXHAUSTED
from fed_tasks.preprocessing import Standardizer
from fed_tasks.spec import JobSpec
from privacy.dp import site_noise

FEATURES = tuple(f"f{i}" for i in range(1, 10))


def _spec(**kw) -> JobSpec:
    return JobSpec(features=FEATURES, label_column="anomaly", **kw)


def _library_epsilon(z: float, steps: int, delta: float, q: float = 1.0) -> float:
    """dp_accounting called directly, as a reader of its documentation would."""
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = RdpAccountant()
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


# ---------------------------------------------------------------- the job's accounting
@pytest.mark.parametrize(("epsilon", "rounds"), [(1.0, 10), (3.0, 10), (10.0, 5)])
def test_job_epsilon_matches_dp_accounting(epsilon, rounds):
    spec = _spec(dp_epsilon=epsilon, rounds=rounds, dp_delta=1e-5)
    z = dp_step.client_plan(spec).noise_multiplier
    for k in (1, rounds // 2, rounds):
        assert dp_step.cumulative_epsilon(spec, k) == pytest.approx(
            _library_epsilon(z, k, 1e-5), rel=1e-12)
    total = _library_epsilon(z, rounds, 1e-5)
    assert total <= epsilon and total == pytest.approx(epsilon, rel=1e-4)
    # the ledger's per-round charges add up to the library's figure for the whole job
    charges = [dp_step.cumulative_epsilon(spec, k) - dp_step.cumulative_epsilon(spec, k - 1)
               for k in range(1, rounds + 1)]
    assert math.fsum(charges) == pytest.approx(total, rel=1e-12)


def test_dp_sgd_epsilon_matches_dp_accounting():
    spec = _spec(dp_epsilon=2.0, dp_sgd=True, trim=0.0, rounds=3, local_epochs=2,
                 batch_size=64)
    n_rows = 1000  # 16 batches per epoch: Poisson rate 1/16, 32 steps per round
    plan = dp_step.sgd_plan(spec, n_rows)
    assert plan.sampling_rate == 1 / 16 and plan.steps_per_round == 32
    assert dp_step.cumulative_epsilon(spec, 3, n_rows) == pytest.approx(
        _library_epsilon(plan.noise_multiplier, 96, 1e-5, 1 / 16), rel=1e-12)
    assert dp_step.cumulative_epsilon(spec, 3, n_rows) <= 2.0
    assert dp_step.cumulative_epsilon(spec, 1, n_rows) == pytest.approx(
        _library_epsilon(plan.noise_multiplier, 32, 1e-5, 1 / 16), rel=1e-12)


def test_spec_dp_fields_are_validated():
    with pytest.raises(ValueError, match="dp_sgd=True needs dp_epsilon"):
        _spec(dp_sgd=True, trim=0.0)
    with pytest.raises(ValueError, match="needs trim=0"):
        _spec(dp_sgd=True, dp_epsilon=1.0)
    for bad in ({"dp_epsilon": 0.0}, {"dp_epsilon": math.inf}, {"dp_delta": 1.0},
                {"dp_clip": -1.0}):
        with pytest.raises(ValueError):
            _spec(**bad)
    assert not _spec().dp_enabled and _spec(dp_epsilon=1.0).dp_enabled


# ---------------------------------------------------------------- clipping and noise
def test_noise_shares_follow_what_the_orchestrator_can_see():
    assert dp_step.noise_shares(_spec(dp_epsilon=1.0, min_sites=3)) == 1  # plain: sees each
    assert dp_step.noise_shares(_spec(dp_epsilon=1.0, min_sites=3, aggregation="paillier")) == 3
    secagg = _spec(dp_epsilon=1.0, min_sites=3, aggregation="secagg")
    assert dp_step.noise_shares(secagg, secure_floor=2) == 2  # the threshold is lower
    assert dp_step.noise_shares(secagg, secure_floor=5) == 3


def test_site_clips_the_update_before_adding_noise():
    spec = _spec(dp_epsilon=1.0, dp_clip=0.25, rounds=4, aggregation="paillier", min_sites=3)
    z = dp_step.client_plan(spec).noise_multiplier
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e6):
        delta = rng.normal(size=500) * scale
        private = dp_step.privatize_update(spec, delta, 3, rng=123)
        noise = site_noise(500, 0.25, z, 3, rng=123)  # the same draw
        clipped = private - noise
        assert np.linalg.norm(clipped) <= 0.25 * (1 + 1e-12)
        if np.linalg.norm(delta) > 0.25:  # same direction, norm C
            cos = clipped @ delta / (np.linalg.norm(clipped) * np.linalg.norm(delta))
            assert cos == pytest.approx(1.0, abs=1e-9)
        else:
            np.testing.assert_allclose(clipped, delta, atol=1e-12)
        assert np.std(noise) == pytest.approx(z * 0.25 / math.sqrt(3), rel=0.15)


def test_dp_site_step_contributes_unit_weight_and_withholds_loss(partitions, schema):
    train, _ = partitions[0]
    spec = _spec(dp_epsilon=5.0, dp_clip=0.5, rounds=2)
    x = train.loc[:, list(FEATURES)].to_numpy(float)
    norm = Standardizer.fit(x)
    weights = site_step.new_model(spec).get_weights()
    msg = site_step.StepInput(1, GlobalState(weights, norm))
    vec = site_step.run(spec, "fit", msg, train, train)["vector"]
    assert vec.shape == (len(weights) + 2,) and vec[-2] == 0.0 and vec[-1] == 1.0
    plain = site_step.run(_spec(rounds=2), "fit", msg, train, train)["vector"]
    assert plain[-1] == len(train) and plain[-2] > 0
    z = dp_step.client_plan(spec).noise_multiplier
    bound = 0.5 + z * 0.5 * (math.sqrt(len(weights)) + 8)  # ||N(0,σ²I_d)|| <= σ(√d + 8)
    assert np.linalg.norm(vec[:-2]) <= bound
    # two calls differ: the noise is fresh and secret, not derived from the public seed
    again = site_step.run(spec, "fit", msg, train, train)["vector"]
    assert not np.array_equal(vec, again)


# ---------------------------------------------------------------- the ledger
def test_ledger_refuses_the_overspending_release_and_survives_reopening(tmp_path):
    spec = _spec(dp_epsilon=3.0, rounds=4)
    cum = [dp_step.cumulative_epsilon(spec, k) for k in range(5)]
    budget = cum[2] + 0.5 * (cum[3] - cum[2])  # room for exactly two rounds
    ledger = PrivacyLedger(tmp_path, "clinic")
    charge = lambda lg: lg.charge("records", spec.job_id, budget=budget, delta=1e-5,  # noqa: E731
                                  cumulative=lambda k: dp_step.cumulative_epsilon(spec, k))
    first, second = charge(ledger), charge(ledger)
    assert first.epsilon == pytest.approx(cum[1]) and second.job_epsilon == pytest.approx(cum[2])
    before = (tmp_path / "privacy_ledger.json").read_bytes()
    with pytest.raises(BudgetExceeded, match=BUDGET_EXHAUSTED + ".*release 3 of job"):
        charge(ledger)
    assert (tmp_path / "privacy_ledger.json").read_bytes() == before  # a refusal costs nothing
    reopened = PrivacyLedger(tmp_path, "clinic")  # a restarted site reads the same ledger
    assert reopened.spent("records") == pytest.approx(cum[2])
    assert reopened.delta_spent("records") == 1e-5  # counted once per job
    assert reopened.job("records", spec.job_id)["releases"] == 2
    with pytest.raises(BudgetExceeded):
        charge(reopened)
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- the policy
def test_policy_lists_every_violation_in_words():
    policy = DatasetPolicy(allowed_models=("iforest",), max_rounds=5, require_dp=True,
                           max_clip=0.5, min_sites=3, max_delta=1e-6,
                           allowed_submitters=(Submitter(email="Alice@Lab.org",
                                                         user_id="a1" * 32),))
    bad = _spec(rounds=6, min_sites=2)
    found = "\n".join(policy.violations(bad, "eve@x.org", remaining=1.0))
    for words in ("model 'ae' is not allowed", "6 rounds exceed the maximum of 5",
                  "below the policy's minimum of 3 sites", "differential privacy is required",
                  "eve@x.org may not submit"):
        assert words in found
    dp = _spec(rounds=5, min_sites=3, dp_epsilon=2.0, dp_clip=1.0, dp_delta=1e-5)
    found = "\n".join(policy.violations(dp, Requester("a1" * 32, "eve@x.org"), remaining=1.5))
    for words in ("dp_clip=1 exceeds the maximum clipping bound 0.5",
                  "dp_delta=1e-05 exceeds the maximum delta 1e-06",
                  "dp_epsilon=2 exceeds the dataset's remaining privacy budget 1.5"):
        assert words in found
    assert "may not submit" not in found  # the syft user id is compared, not the e-mail
    ok = DatasetPolicy().violations(_spec(dp_epsilon=3.0, dp_sgd=True, trim=0.0),
                                    "anyone@x.org", remaining=10.0, rows=5_000)
    assert ok == []


def test_policy_round_trips_through_the_description_and_the_store(tmp_path):
    policy = DatasetPolicy(max_rounds=7, epsilon_budget=4.0, require_dp=True)
    text = policy.plain_words(spent=1.25)
    assert "at most 7 training rounds" in text and "epsilon 4 across all jobs" in text
    assert "1.25 spent so far" in text and "required" in text
    assert DatasetPolicy.from_description("Private table.\n\n" + text) == policy
    store = PolicyStore(tmp_path, "clinic")
    assert store.get() == DatasetPolicy()  # the permissive default
    store.put(policy)
    assert PolicyStore(tmp_path, "clinic").get() == policy
    (tmp_path / "policy.json").write_text("{broken")
    with pytest.raises(ValueError, match="unreadable"):
        PolicyStore(tmp_path, "clinic")


def test_cli_dp_flags_need_epsilon():
    import subprocess
    import sys
    from pathlib import Path

    fedsyft = Path(sys.executable).parent / "fedsyft"
    proc = subprocess.run([str(fedsyft), "demo", "--clip", "0.5"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "need --epsilon" in proc.stderr
    help_text = subprocess.run([str(fedsyft), "demo", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--epsilon", "--delta", "--clip", "--dp-unit"):
        assert flag in help_text
