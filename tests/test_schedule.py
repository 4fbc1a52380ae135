"""The job's schedule of aggregates: one order every party derives from the spec alone."""

from __future__ import annotations

import numpy as np
import pytest

from datasites.governance.guard import call_limits
from datasites.runtime.key_authority_site import KeyAuthoritySite
from fed_tasks import schedule
from fed_tasks.codec import PayloadError
from fed_tasks.encoding import secagg_plan
from fed_tasks.site_state import ModelStateError, SiteModelState
from fed_tasks.spec import JobSpec

FEATURES = tuple(f"f{i}" for i in range(1, 10))


def _spec(**kw) -> JobSpec:
    return JobSpec(features=FEATURES, **kw)


def test_an_autoencoder_job_keeps_its_slots_statistics_then_rounds_then_calibration():
    spec = _spec(rounds=4, target_fpr=0.01)
    slots = [schedule.slot_at(spec, i) for i in range(schedule.total_slots(spec))]
    assert slots == [("stats", 0), ("fit", 1), ("fit", 2), ("fit", 3), ("fit", 4),
                     ("calibrate", 1), ("calibrate", 2)]
    for i, (action, k) in enumerate(slots):
        assert schedule.slot_index(spec, action, k) == i
    assert schedule.slot_index(_spec(rounds=4), "fit", 3) == 3  # as before: slot r = round r


@pytest.mark.parametrize("action,k", [("fit", 0), ("fit", 5), ("stats", 1), ("hist", 1),
                                      ("calibrate", 1), ("evaluate", 1)])
def test_a_pass_the_job_does_not_have_is_refused(action, k):
    with pytest.raises(PayloadError):
        schedule.slot_index(_spec(rounds=4), action, k)
    with pytest.raises(PayloadError):
        schedule.slot_at(_spec(rounds=4), 5)


@pytest.mark.parametrize("model,phase,length", [("pca", "moments2", 45 + 9 + 1),
                                                ("hbos", "hist", 9 * 66)])
def test_detectors_built_from_sums_have_one_phase_and_no_rounds(model, phase, length):
    spec = _spec(model=model, rounds=50, target_fpr=0.05)
    assert [(p.action, p.count) for p in schedule.phases(spec)] == [
        ("stats", 1), (phase, 1), ("calibrate", 2)]
    assert schedule.vector_length(spec, phase) == length
    limits = call_limits(spec)
    assert limits[phase] == 1 and "fit" not in limits and limits["calibrate"] == 2
    assert KeyAuthoritySite.call_limits(None, spec) == {"decrypt": 4}  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["ae", "pca", "hbos"])
def test_one_secure_sum_session_fits_every_phase_of_the_job(model):
    spec = _spec(model=model, rounds=5, target_fpr=0.01, aggregation="secagg")
    plan = secagg_plan(spec, 1000)
    assert plan["bits"] <= 64
    assert plan["rounds"] == schedule.total_slots(spec)
    assert plan["vector_length"] == max(p.length for p in schedule.phases(spec))
    limits = call_limits(spec)
    assert limits["secagg_recover"] == schedule.total_slots(spec)


def test_calibration_is_not_scheduled_under_differential_privacy():
    spec = _spec(rounds=3, target_fpr=0.01, dp_epsilon=3.0)
    assert [p.action for p in schedule.phases(spec)] == ["stats", "fit"]


@pytest.mark.parametrize("model", ["iforest", "deepsvdd"])  # pca, hbos: tests/test_dp_sums.py
def test_detectors_with_sums_no_site_can_noise_refuse_differential_privacy(model):
    with pytest.raises(ValueError, match="no site can noise yet"):
        _spec(model=model, dp_epsilon=3.0)


@pytest.mark.parametrize("mode", ["paillier", "secagg"])
def test_a_forest_is_pooled_so_it_refuses_the_secure_modes(mode):
    with pytest.raises(ValueError, match="cannot do: use aggregation 'plain'"):
        _spec(model="iforest", aggregation=mode)


def test_training_stops_when_the_loss_stops_improving_and_never_under_dp():
    spec = _spec(rounds=20, patience=2, min_delta=0.01)
    assert not schedule.training_done(spec, [1.0, 0.5, 0.4])
    assert not schedule.training_done(spec, [1.0, 0.5, 0.499, 0.3])  # improved again
    assert schedule.training_done(spec, [1.0, 0.5, 0.499, 0.498])  # two rounds under 1 %
    assert not schedule.training_done(_spec(rounds=20), [1.0, 1.0, 1.0, 1.0])  # patience 0
    dp = _spec(rounds=20, patience=2, dp_epsilon=3.0)
    assert not schedule.training_done(dp, [1.0, 1.0, 1.0, 1.0])


def test_only_the_rest_of_the_training_rounds_may_be_skipped():
    spec = _spec(rounds=5, target_fpr=0.05)  # stats 0 | fit 1..5 | calibrate 6, 7
    assert schedule.may_follow(spec, 2, 3)
    assert schedule.may_follow(spec, 2, 6)  # stopped early after round 2: calibration next
    assert not schedule.may_follow(spec, 2, 7)  # a calibration pass is never skipped
    assert not schedule.may_follow(spec, 0, 6)  # at least one round
    assert not schedule.may_follow(spec, 6, 6) and not schedule.may_follow(spec, 3, 2)


def test_a_site_answers_a_retry_of_its_last_call_and_refuses_any_other_order(tmp_path):
    spec = _spec(model="hbos", target_fpr=0.05)
    state = SiteModelState.initial(spec, np.zeros(0), path=tmp_path / "m.json")
    assert state.check_slot(0) is False  # statistics first
    state.record_trained(0, {"reply": "stats"})
    assert state.check_slot(0) is True  # the exact retry gets the saved reply
    with pytest.raises(ModelStateError, match="out of order"):
        state.check_slot(1)  # the histograms need the statistics' aggregate first
    state.apply("stats", 0, np.array([10.0, *np.zeros(2 * len(spec.features))]))
    with pytest.raises(ModelStateError, match="out of order"):
        state.check_slot(2)  # a skipped slot: the site does not hold aggregate 1
    assert state.check_slot(1) is False
    state.record_trained(1, {"reply": "hist"})
    with pytest.raises(ModelStateError, match="out of order"):
        state.check_slot(0)  # a replay of the statistics
