"""Every detector of the zoo learns, and trains through the approved-job path of real
datasites in the aggregation modes it supports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import IsolationForest

from datasites.harness.demo import BUNDLED_LABEL
from fed_tasks.evaluation import detection_metrics
from fed_tasks.global_state import GlobalState
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer, TrainingResult
from fed_tasks.site_step import initial_weights
from fed_tasks.spec import JobSpec


@pytest.fixture(scope="module")
def broken_correlations(shuttle) -> tuple[list[pd.DataFrame], pd.DataFrame, tuple[str, ...]]:
    """Real normal shuttle rows, and anomalies whose every value is a real normal value but
    drawn from different rows: each feature alone looks normal, only the joint structure
    is broken. An untrained network (whose score is roughly a row's norm) barely sees them,
    so a detector that beats its untrained self here has learned the federation's rows."""
    normal = shuttle[shuttle[BUNDLED_LABEL] == 0].drop(columns=BUNDLED_LABEL)
    normal = normal.sample(3000, random_state=0).reset_index(drop=True)
    rng = np.random.default_rng(0)
    anomalies = pd.DataFrame({c: rng.permutation(normal[c].to_numpy())[:600]
                              for c in normal.columns})
    frame = pd.concat([normal.assign(**{BUNDLED_LABEL: 0}),
                       anomalies.assign(**{BUNDLED_LABEL: 1})], ignore_index=True)
    frame = frame.sample(frac=1.0, random_state=2).reset_index(drop=True)
    test, train = frame.iloc[:1200], frame.iloc[1200:]
    return [train.iloc[i::3] for i in range(3)], test, tuple(normal.columns)


def _auc(result: TrainingResult, test: pd.DataFrame, features: tuple[str, ...]) -> float:
    scores = result.score_samples(test[list(features)].to_numpy(np.float64))
    return detection_metrics(test[BUNDLED_LABEL].to_numpy(), scores)["roc_auc"]


@pytest.mark.parametrize("model", ["ae", "vae", "deepsvdd"])
def test_each_neural_detector_learns_what_its_untrained_self_cannot_see(broken_correlations,
                                                                         model):
    parts, test, features = broken_correlations
    spec = JobSpec(model=model, features=features, label_column=BUNDLED_LABEL, rounds=10)
    sites = [LocalSite(f"s{i}", spec, part, test) for i, part in enumerate(parts)]
    trained = FederatedTrainer(spec, sites, progress=False).fit()
    assert trained.state is not None
    untrained_state = GlobalState(initial_weights(spec), trained.norm,
                                  extra=dict(trained.state.extra))  # same scaling and centre
    untrained = TrainingResult(spec, untrained_state.weights, trained.norm,
                               state=untrained_state)
    before, after = _auc(untrained, test, features), _auc(trained, test, features)
    assert before < 0.65, before  # the untrained model is weak here
    assert after >= before + 0.05, (before, after)
    assert trained.losses[-1] < trained.losses[0]


def test_the_federated_forest_ranks_like_a_centralized_isolation_forest(partitions, schema):
    spec = JobSpec(model="iforest", features=schema.features, label_column=schema.label)
    sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
    result = FederatedTrainer(spec, sites, progress=False).fit()
    train = pd.concat([tr for tr, _ in partitions], ignore_index=True)
    test = pd.concat([te for _, te in partitions], ignore_index=True)
    x, y = test[list(schema.features)].to_numpy(np.float64), test[schema.label].to_numpy()
    ours = detection_metrics(y, result.score_samples(x))["roc_auc"]
    central = IsolationForest(n_estimators=150, random_state=0).fit(
        train[list(schema.features)].to_numpy(np.float64))
    theirs = detection_metrics(y, -central.score_samples(x))["roc_auc"]
    assert ours >= theirs - 0.02, (ours, theirs)
    assert len(result.model().trees_) == 50 * len(sites)  # the union of every site's trees


def test_early_stopping_ends_training_and_the_sites_accept_the_shorter_job(partitions,
                                                                            schema):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=40,
                   patience=2, min_delta=0.05, target_fpr=0.05)
    sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
    trainer = FederatedTrainer(spec, sites, progress=False)
    result = trainer.fit()
    assert result.converged and 2 < result.rounds_completed < 40
    assert result.threshold is not None  # calibration ran after the last round
    assert all(e["tp"] + e["fp"] + e["fn"] + e["tn"] == len(te)
               for e, (_, te) in zip(trainer.evaluate(result), partitions, strict=True))


@pytest.mark.parametrize("model,mode", [("vae", "secagg"), ("deepsvdd", "paillier"),
                                        ("deepsvdd", "secagg"), ("iforest", "plain")])
def test_a_detector_trains_through_the_datasites(federation, schema, model, mode):
    """One approval per site; the sites' own models score their test splits; the job's
    every summed call is counted against the approval."""
    spec = JobSpec(model=model, features=schema.features, label_column=schema.label,
                   rounds=2, aggregation=mode, target_fpr=0.05)
    federation.approve_all(federation.submit(spec))
    trainer = federation.trainer(spec, progress=False)
    result = trainer.fit()
    evaluation = trainer.evaluate(result)
    assert all(e["roc_auc"] > 0.8 for e in evaluation), evaluation
    for site in federation.sites:
        used = site.guard.approval(spec.job_id)["used"]
        assert used.get("calibrate") == 2
        if model == "iforest":
            assert used.get("hist") == 1 and used.get("trees") == 1
        else:
            assert used.get("fit") == 2
        if model == "deepsvdd":
            assert used.get("center") == 1


@pytest.mark.parametrize("mode", ["secagg", "plain"])
def test_sites_follow_an_early_stop_to_the_calibration(federation, schema, mode):
    """The rounds are a maximum: after an early stop the sites go on with the calibration
    (what else may not be skipped: tests/test_schedule.py)."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=30,
                   patience=1, min_delta=0.5, aggregation=mode, target_fpr=0.05)
    federation.approve_all(federation.submit(spec))
    trainer = federation.trainer(spec, progress=False)
    result = trainer.fit()
    assert result.converged and result.rounds_completed < 5 and result.threshold is not None
    for site in federation.sites:
        used = site.guard.approval(spec.job_id)["used"]
        assert used["fit"] < 6 and used["calibrate"] == 2
