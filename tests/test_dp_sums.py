"""Row-level DP for the detectors built from sums (fed_tasks/dp_sums.py), without datasites:
sensitivities hold for real and adversarial rows, the accountant's figures, the noise, and
what stays refused. Through real datasites: tests/test_sum_detectors.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_tasks import calibration, dp_step, dp_sums, histograms, schedule, site_step
from fed_tasks.codec import PayloadError
from fed_tasks.detectors.pca import PCADetector, moment_sums
from fed_tasks.global_state import GlobalState
from fed_tasks.preprocessing import Moments, Standardizer
from fed_tasks.spec import JobSpec
from privacy.dp import epsilon_for, noise_multiplier_for

FEATURES = tuple(f"f{i}" for i in range(9))


def _spec(**kw) -> JobSpec:
    return JobSpec(features=FEATURES, label_column="y", **{"dp_epsilon": 1.0, **kw})


def _rows(rng, n=200) -> np.ndarray:
    """Ordinary rows, and rows built to be as large as possible in one direction."""
    big = np.zeros((9, 9))
    np.fill_diagonal(big, 1e6)
    return np.vstack([rng.normal(size=(n, 9)), rng.normal(size=(n, 9)) * 50, big,
                      np.full((1, 9), -1e4)])


@pytest.mark.parametrize("bound", [0.5, 3.0, 10.0])
def test_one_clipped_rows_moments_stay_within_the_stated_sensitivity(bound):
    spec = _spec(model="pca", dp_row_clip=bound)
    delta = dp_sums.sensitivity(spec, "moments2")
    assert delta == pytest.approx(math.sqrt(bound**4 + bound**2 + 1))
    rows = dp_sums.clip_rows(_rows(np.random.default_rng(0)), bound)
    assert np.all(np.linalg.norm(rows, axis=1) <= bound)
    norms = [np.linalg.norm(moment_sums(r[None, :])) for r in rows]
    assert max(norms) <= delta
    assert max(norms) >= 0.99 * delta  # a row along an axis reaches it: the bound is tight


def test_rows_inside_the_bound_are_not_changed():
    rows = np.random.default_rng(1).normal(size=(50, 9)) * 0.1
    np.testing.assert_array_equal(dp_sums.clip_rows(rows, 3.0), rows)


def test_one_row_moves_the_histograms_by_root_d_and_the_threshold_counts_by_one():
    spec = _spec(model="hbos", target_fpr=0.05)
    rows = _rows(np.random.default_rng(2))
    for r in rows:
        assert np.linalg.norm(histograms.counts(r[None, :])) == pytest.approx(
            dp_sums.sensitivity(spec, "hist"))
    assert dp_sums.sensitivity(spec, "hist") == pytest.approx(3.0)
    counts = calibration.local_counts(spec, 1, {}, np.array([np.nan]))
    assert np.linalg.norm(counts) == 1.0 == dp_sums.sensitivity(spec, "calibrate")


@pytest.mark.parametrize(("model", "fpr", "releases"), [("pca", None, 1), ("pca", 0.05, 3),
                                                        ("hbos", None, 1), ("hbos", 0.01, 3)])
def test_the_job_noise_multiplier_and_charges_come_from_the_accountant(model, fpr, releases):
    spec = _spec(model=model, target_fpr=fpr, dp_epsilon=1.0, dp_delta=1e-5)
    assert dp_sums.releases(spec) == releases
    z = dp_sums.noise_multiplier(spec)
    assert z == noise_multiplier_for(1.0, releases, 1e-5)
    assert dp_step.noise_multiplier(spec) == z
    cum = [dp_step.cumulative_epsilon(spec, k) for k in range(releases + 2)]
    assert cum[0] == 0.0 and cum[releases] <= 1.0 and cum[releases] == pytest.approx(1.0, 1e-3)
    assert cum[releases] == epsilon_for(z, releases, 1e-5)
    assert cum[releases + 1] > cum[releases]  # a retried release keeps composing
    with pytest.raises(ValueError, match="client-level"):
        dp_step.client_plan(spec)


def test_a_dp_sum_job_schedules_a_coarser_threshold_and_no_training():
    spec = _spec(model="hbos", target_fpr=0.05)
    assert [(p.action, p.count, p.length) for p in schedule.phases(spec)] == [
        ("stats", 1, 19), ("hist", 1, 9 * 66), ("calibrate", 2, calibration.DP_COARSE + 2)]
    exact = JobSpec(model="hbos", features=FEATURES, target_fpr=0.05)
    assert schedule.phase(exact, "calibrate").length == calibration.COARSE + 2
    # a DP neural job still gets no threshold: its sites have no per-row noise for counts
    assert not schedule.has_phase(_spec(model="ae", target_fpr=0.05), "calibrate")


@pytest.mark.parametrize(("aggregation", "shares"), [("plain", 1), ("paillier", 3)])
def test_each_site_adds_its_share_of_the_noise(aggregation, shares):
    spec = _spec(model="hbos", aggregation=aggregation, min_sites=3)
    assert dp_step.noise_shares(spec) == shares
    zeros = np.zeros(200_000)
    noised = dp_sums.privatize(spec, "hist", zeros, shares)
    want = dp_sums.noise_std(spec, "hist") / math.sqrt(shares)
    assert np.std(noised) == pytest.approx(want, rel=0.02)
    again = dp_sums.privatize(spec, "hist", zeros, shares)
    assert not np.array_equal(noised, again)  # seeded from `secrets`, never the spec's seed


def test_the_site_step_noises_every_sum_of_a_dp_job_and_the_detectors_cope(shuttle_small,
                                                                          schema):
    train = shuttle_small.iloc[:1500]
    spec = JobSpec(model="pca", features=schema.features, label_column=schema.label,
                   dp_epsilon=1.0, target_fpr=0.05)
    norm = Standardizer.from_moments(Moments.of(train[list(schema.features)].to_numpy()))
    state = GlobalState(np.zeros(0), norm)
    step = site_step.StepInput(1, state)
    got = site_step.contribute(spec, "moments2", train, step)["vector"]
    z = norm.transform(train[list(schema.features)].to_numpy())
    exact = moment_sums(dp_sums.clip_rows(z, spec.dp_row_clip))
    noise = got - exact
    assert np.std(noise) == pytest.approx(dp_sums.noise_std(spec, "moments2"), rel=0.5)
    detector = PCADetector().fit_sums(got, noise_std=dp_sums.noise_std(spec, "moments2"))
    assert np.all(detector.eigenvalues_ > 0) and np.all(np.isfinite(detector.score_samples(z)))
    state.extra["moments2:1"] = got
    counts = site_step.contribute(spec, "calibrate", train, step)["vector"]
    assert counts.shape == (calibration.DP_COARSE + 2,) and not np.array_equal(counts,
                                                                            np.rint(counts))


def test_what_no_mechanism_covers_stays_refused():
    for model in ("deepsvdd", "iforest"):
        with pytest.raises(ValueError, match="no site can noise yet"):
            _spec(model=model)
    pca = _spec(model="pca")
    assert not dp_sums.covers(pca, "hist") and not dp_sums.covers(pca, "fit")
    assert not dp_sums.covers(_spec(), "calibrate")  # a DP autoencoder: not row-level
    with pytest.raises(PayloadError, match="no row-level DP release 'hist'"):
        dp_sums.sensitivity(pca, "hist")
