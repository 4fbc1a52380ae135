"""Detectors built from sums alone: federated equals centralized, in every aggregation mode,
and the alarm threshold from summed score histograms hits its false-positive target; under
differential privacy (fed_tasks/dp_sums.py) each sum is noised, charged and still useful.

The DP jobs spend epsilon 1 at every site of the session federation (default budget 10)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from datasites.governance.audit import Action
from datasites.governance.policy import DatasetPolicy
from datasites.governance.site_privacy import PrivacyRefused
from datasites.harness.demo import BUNDLED_LABEL
from fed_tasks import calibration, dp_step, dp_sums, histograms, site_step
from fed_tasks.calibration import COARSE
from fed_tasks.codec import decode_array
from fed_tasks.detectors.hbos import HBOSDetector
from fed_tasks.detectors.pca import PCADetector, moment_sums
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec
from privacy.signing import SignedContribution

CENTRAL = {"pca": PCADetector, "hbos": HBOSDetector}


def _spec(schema, model, **kw) -> JobSpec:
    return JobSpec(model=model, features=schema.features, label_column=schema.label, **kw)


def _union(frames) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)


def _central_scores(model, result, train, rows, features):
    """The same detector fitted on the union of the training rows, scaled as released."""
    detector = CENTRAL[model]().fit(result.norm.transform(train[list(features)].to_numpy()))
    return detector.score_samples(result.norm.transform(rows[list(features)].to_numpy()))


@pytest.mark.parametrize("model", ["pca", "hbos"])
def test_in_memory_federated_detector_equals_the_centralized_one(partitions, schema, model):
    spec = _spec(schema, model)
    sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
    result = FederatedTrainer(spec, sites, progress=False).fit()
    train, test = _union([p[0] for p in partitions]), _union([p[1] for p in partitions])
    x = test[list(schema.features)].to_numpy()
    np.testing.assert_allclose(result.score_samples(x),
                               _central_scores(model, result, train, test, schema.features),
                               rtol=1e-9)


SECURE_CASES = [("pca", "paillier"), ("hbos", "secagg")]  # each detector, each secure sum


@pytest.fixture(scope="module")
def secure_results(federation, schema):
    out = {}
    for model, mode in SECURE_CASES:
        spec = _spec(schema, model, aggregation=mode, target_fpr=0.05)
        federation.approve_all(federation.submit(spec))
        trainer = federation.trainer(spec, progress=False)
        result = trainer.fit()
        out[model, mode] = (result, trainer.evaluate(result))
    return out


@pytest.mark.parametrize("model,mode", SECURE_CASES)
def test_secure_federated_detector_equals_the_centralized_one(secure_results, partitions,
                                                              schema, model, mode):
    result, evaluation = secure_results[model, mode]
    train, test = _union([p[0] for p in partitions]), _union([p[1] for p in partitions])
    got = result.score_samples(test[list(schema.features)].to_numpy())
    want = _central_scores(model, result, train, test, schema.features)
    # histogram counts are integers (exact); each summed moment carries 2^-17 of fixed-point
    # rounding per site, which the smallest principal variances amplify (measured: 2e-5)
    np.testing.assert_allclose(got, want, rtol=1e-9 if model == "hbos" else 1e-4)
    assert all(e["roc_auc"] > 0.9 for e in evaluation)
    # the counts at the calibrated threshold cover each site's test split
    for e, (_, te) in zip(evaluation, partitions, strict=True):
        assert e["tp"] + e["fp"] + e["fn"] + e["tn"] == len(te)


def test_the_threshold_hits_its_false_positive_rate_on_held_out_normal_rows(shuttle):
    normal = shuttle[shuttle[BUNDLED_LABEL] == 0].sample(frac=1.0, random_state=3)
    features = tuple(c for c in shuttle.columns if c != BUNDLED_LABEL)
    train, held_out = normal.iloc[:15_000], normal.iloc[15_000:35_000]
    for model, fpr in (("hbos", 0.01), ("pca", 0.05)):
        spec = JobSpec(model=model, features=features, label_column=BUNDLED_LABEL,
                       target_fpr=fpr)
        sites = [LocalSite(f"s{i}", spec, part, part.iloc[:10])
                 for i, part in enumerate(train.iloc[j::3] for j in range(3))]
        result = FederatedTrainer(spec, sites, progress=False).fit()
        alarms = result.predict(held_out[list(features)].to_numpy())
        assert abs(alarms.mean() - fpr) <= 0.01, (model, fpr, alarms.mean())


def test_only_counts_of_scores_leave_a_site_for_the_threshold(partitions, schema):
    """Each calibration contribution is a vector of 1,026 bin counts summing to the site's
    training rows: integers, so no score value is in it."""
    spec = _spec(schema, "pca", target_fpr=0.05)
    sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
    trainer = FederatedTrainer(spec, sites, progress=False)
    seen: list[tuple[str, np.ndarray]] = []
    for site in sites:
        original = site.call

        def spy(action, message, _call=original, _name=site.name):
            reply = _call(action, message)
            if action == "calibrate":
                payload = SignedContribution.from_str(reply["contribution"]).payload
                seen.append((_name, decode_array(payload)))
            return reply

        site.call = spy  # type: ignore[method-assign]
    trainer.fit()
    rows = {s.name: len(s.train) for s in sites}
    assert len(seen) == 2 * len(sites)  # two passes
    for name, counts in seen:
        assert counts.shape == (COARSE + 2,)
        assert np.array_equal(counts, np.rint(counts)) and counts.min() >= 0
        assert counts.sum() == rows[name]


# ---- differential privacy per row (fed_tasks/dp_sums.py), through the session federation ----
def _exact_sums(spec, result, partitions, schema) -> dict[str, np.ndarray]:
    """The sums the sites would have released without noise (the released scaling and model
    applied to the union of their training rows)."""
    zs = [result.norm.transform(tr[list(schema.features)].to_numpy()) for tr, _ in partitions]
    if spec.model == "pca":
        main = sum(moment_sums(dp_sums.clip_rows(z, spec.dp_row_clip)) for z in zs)
    else:
        main = sum(histograms.counts(z).ravel() for z in zs)
    scores = result.model().score_samples(np.vstack(zs))
    return {f"{dp_sums.DETECTOR_ACTION[spec.model]}:1": main,
            "calibrate:1": calibration.local_counts(spec, 1, {}, scores)}


def _auc(detector, result, frame, schema) -> float:
    z = result.norm.transform(frame[list(schema.features)].to_numpy())
    return float(roc_auc_score(frame[schema.label], detector.score_samples(z)))


@pytest.mark.parametrize("model,mode", [("pca", "plain"), ("hbos", "secagg")])
def test_a_dp_sum_detector_is_noised_charged_and_stays_useful(federation, partitions, schema,
                                                              model, mode):
    spec = _spec(schema, model, aggregation=mode, dp_epsilon=1.0, target_fpr=0.05)
    federation.approve_all(federation.submit(spec))
    trainer = federation.trainer(spec, progress=False)
    result = trainer.fit()
    assert not result.stopped_early
    # charged before each of the 3 releases (sum, 2 threshold passes): the accountant's figures
    cum = [dp_sums.cumulative_epsilon(spec, k) for k in range(4)]
    assert cum[3] <= 1.0
    for site in federation.sites:
        job = site.guard.privacy.ledger.job("records", spec.job_id)
        assert job["kind"] == "dp_sums" and job["releases"] == 3
        assert job["charges"] == pytest.approx(np.diff(cum).tolist(), rel=1e-12)
        assert job["epsilon"] == pytest.approx(cum[3], rel=1e-12)
        logged = [e["params"] for e in site.guard.audit.entries(action=Action.BUDGET_CHARGED)
                  if e["objects"]["job_id"] == spec.job_id]
        assert [p["release"] for p in logged] == [1, 2, 3]
        assert all(p["noise_multiplier"] == dp_sums.noise_multiplier(spec) for p in logged)
    # noise really added: the released sums differ from the exact ones by the planned amount
    shares = dp_step.noise_shares(spec, federation.sites[0].guard.privacy._secure_floor(spec))
    assert shares == (1 if mode == "plain" else 2)
    exact = _exact_sums(spec, result, partitions, schema)
    for key, want in exact.items():
        std = dp_sums.noise_std(spec, key.split(":")[0]) * math.sqrt(len(partitions) / shares)
        assert 0.6 * std < np.std(result.state.extra[key] - want) < 1.5 * std, key
    # still useful: pooled ROC-AUC on the private test splits (a random or untrained hbos
    # scorer: 0.5), and close to the same detector built from the exact sums (measured over
    # 150 in-memory runs of these partitions: hbos plain 0.981 ± 0.008, min 0.954; pca
    # 0.986 ± 0.002; the exact sums give 0.990)
    test = _union([te for _, te in partitions])
    auc = _auc(result.model(), result, test, schema)
    main = exact[f"{dp_sums.DETECTOR_ACTION[model]}:1"]
    noiseless = (PCADetector().fit_sums(main) if model == "pca"
                 else HBOSDetector().fit_counts(main))
    assert auc > 0.9 and auc > _auc(noiseless, result, test, schema) - 0.07
    assert result.threshold is not None and math.isfinite(result.threshold)
    evaluation = trainer.evaluate(result)
    for e, (_, te) in zip(evaluation, partitions, strict=True):
        assert e["tp"] + e["fp"] + e["fn"] + e["tn"] == len(te)


@contextlib.contextmanager
def _budget_left(site, epsilon: float):
    """The owner leaves exactly ``epsilon`` of the budget, then restores the default policy."""
    spent = site.guard.privacy.ledger.spent("records")
    site.set_policy(epsilon_budget=spent + epsilon, reason="test budget")
    try:
        yield
    finally:
        site.set_policy(DatasetPolicy(), reason="test over: back to the default")


def test_the_owner_reads_what_a_dp_sum_job_noises_and_an_unaffordable_one_is_refused(
        federation, schema):
    site, session = federation.sites[0], federation.sessions()[0]
    spec = _spec(schema, "pca", dp_epsilon=0.5, target_fpr=0.05)
    rid = session.submit(spec)
    text = site.review(rid).plain_words()
    z = dp_sums.noise_multiplier(spec)
    for words in ("per row, epsilon 0.5 at delta 1e-05", "each of its 3 summed release(s)",
                  f"noise multiplier {z:.3g}", "clipped to L2 norm 3: sensitivity 9.54",
                  f"noise std {z * math.sqrt(91):.3g} on each released value",
                  f"noise std {z:.3g} on each released count", "this site adds all of it",
                  "feature counts/sums of the published mock", "the metrics (not noised)"):
        assert words in text, words
    with _budget_left(site, 0.4):
        with pytest.raises(PermissionError, match="remaining privacy budget 0.4"):
            site.approve(rid)
    assert site.guard.privacy.ledger.job("records", spec.job_id) is None


def test_a_summed_release_no_mechanism_covers_stays_refused_under_dp(federation, partitions,
                                                                     schema):
    for model in ("deepsvdd", "iforest"):
        with pytest.raises(ValueError, match="releases sums that no site can noise yet"):
            _spec(schema, model, dp_epsilon=1.0)
    # the site's own check, should a spec ever get past that: refused, nothing computed
    site = federation.sites[0]
    privacy = site.guard.privacy
    train, test = partitions[0]
    base = _spec(schema, "ae", dp_epsilon=1.0).model_dump()
    # (an owner who runs noise-swamped jobs with a warning: the fail-closed check is next)
    site.set_policy(noisy_dp="warn", reason="test: past the noise check")
    cases = [({**base, "model": "deepsvdd"}, "center"), ({**base, "model": "iforest"}, "trees"),
             ({**base, "model": "pca"}, "hist"), ({**base, "target_fpr": 0.05}, "calibrate")]
    try:
        for fields, action in cases:
            spec = JobSpec.model_construct(**fields)
            with pytest.raises(PrivacyRefused,
                               match=f"asks for '{action}' under differential"):
                privacy.run_step(spec, action, site_step.StepInput(1), train, test, None)
    finally:
        site.set_policy(DatasetPolicy(), reason="test over: back to the default")
    assert privacy.ledger.job("records", base["job_id"]) is None
