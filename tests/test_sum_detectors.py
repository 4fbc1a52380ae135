"""Detectors built from sums alone: federated equals centralized, in every aggregation mode,
and the alarm threshold from summed score histograms hits its false-positive target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datasites.harness.demo import BUNDLED_LABEL
from fed_tasks.calibration import COARSE
from fed_tasks.codec import decode_array
from fed_tasks.detectors.hbos import HBOSDetector
from fed_tasks.detectors.pca import PCADetector
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


@pytest.fixture(scope="module")
def secure_results(federation, schema):
    out = {}
    for model in ("pca", "hbos"):
        for mode in ("paillier", "secagg"):
            spec = _spec(schema, model, aggregation=mode, target_fpr=0.05)
            federation.approve_all(federation.submit(spec))
            trainer = federation.trainer(spec, progress=False)
            result = trainer.fit()
            out[model, mode] = (result, trainer.evaluate(result))
    return out


@pytest.mark.parametrize("mode", ["paillier", "secagg"])
@pytest.mark.parametrize("model", ["pca", "hbos"])
def test_secure_federated_detector_equals_the_centralized_one(secure_results, partitions,
                                                              schema, model, mode):
    result, evaluation = secure_results[model, mode]
    train, test = _union([p[0] for p in partitions]), _union([p[1] for p in partitions])
    got = result.score_samples(test[list(schema.features)].to_numpy())
    want = _central_scores(model, result, train, test, schema.features)
    # histogram counts are integers (exact); moments carry 2^-13 of fixed-point rounding
    np.testing.assert_allclose(got, want, rtol=1e-9 if model == "hbos" else 1e-5)
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
