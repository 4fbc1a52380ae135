"""The data scientist's building blocks, without any datasite."""

from __future__ import annotations

import numpy as np
import pytest

from fed_tasks.codec import PayloadError, decode_array, dumps, encode_array, loads
from fed_tasks.detectors.ae import AutoencoderDetector
from fed_tasks.encoding import STATS_CODEC
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.preprocessing import Moments, Standardizer
from fed_tasks.spec import JobSpec
from fed_tasks.strategies.fedavg import FedAvg
from fed_tasks.strategy import SummedUpdate, pack_update


def test_array_codec_round_trip_and_errors():
    x = np.random.default_rng(0).normal(size=1000)
    assert np.array_equal(decode_array(encode_array(x), 1000), x)
    with pytest.raises(PayloadError, match="expected 999"):
        decode_array(encode_array(x), 999)
    with pytest.raises(PayloadError, match="base64"):
        decode_array("not base64 !!")
    with pytest.raises(PayloadError, match="NaN"):
        decode_array(encode_array(np.array([1.0, np.nan])))


def test_message_codec_compresses_large_messages():
    big = {"w": encode_array(np.zeros(5000))}
    text = dumps(big)
    assert text.startswith("z") and loads(text) == big
    with pytest.raises(PayloadError):
        loads("q{}")


def test_standardizer_from_summed_moments_equals_pooled(shuttle_small, schema):
    x = shuttle_small.loc[:, list(schema.features)].to_numpy(float)
    parts = np.array_split(x, 3)
    total = Moments.of(parts[0]) + Moments.of(parts[1]) + Moments.of(parts[2])
    fed, pooled = Standardizer.from_moments(total), Standardizer.fit(x)
    assert np.allclose(fed.mean, pooled.mean) and np.allclose(fed.std, pooled.std)


def test_fedavg_is_the_sample_weighted_mean_of_deltas():
    w = np.zeros(4)
    d1, d2 = np.array([1.0, 1, 1, 1]), np.array([4.0, 0, 0, 0])
    summed = SummedUpdate(pack_update(d1, 0.5, 10) + pack_update(d2, 1.0, 30))
    assert np.allclose(FedAvg().step(w, summed, {}), [3.25, 0.25, 0.25, 0.25])
    assert summed.mean_loss == pytest.approx((5 + 30) / 40)


def test_autoencoder_weights_round_trip_and_shape_check():
    m = AutoencoderDetector(9, seed=0)
    w = m.get_weights()
    m2 = AutoencoderDetector(9, seed=1)
    m2.set_weights(w)
    assert np.array_equal(m2.get_weights(), w)
    with pytest.raises(ValueError, match="model needs"):
        m2.set_weights(w[:-1])


def test_autoencoder_scores_real_anomalies_higher(shuttle_small, schema):
    x = shuttle_small.loc[:, list(schema.features)].to_numpy(float)
    y = shuttle_small["anomaly"].to_numpy()
    norm = Standardizer.fit(x)
    m = AutoencoderDetector(9, seed=0)
    m.fit(norm.transform(x), epochs=20, trim=0.2)
    s = m.score_samples(norm.transform(x))
    assert s[y == 1].mean() > 3 * s[y == 0].mean()


def test_in_memory_federated_training_learns(partitions, schema):
    spec = JobSpec(features=schema.features, label_column="anomaly", rounds=3)
    sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
    trainer = FederatedTrainer(spec, sites, progress=False)
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0]
    metrics = trainer.evaluate(result)
    assert all(m["roc_auc"] > 0.9 for m in metrics)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError):
        JobSpec(features=("a", "a"))
    with pytest.raises(ValueError):
        JobSpec(features=("a",), rounds=0)
    with pytest.raises(ValueError):
        JobSpec(features=("a",), job_id="Bad ID!")


def test_a_column_constant_across_the_federation_scores_nothing():
    """Constant at every site (so constant in the released sums): every value maps to 0, so
    a test row that differs cannot swamp the score; a column that varies stays as it was."""
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(1000.0, 5.0, 3000), np.full(3000, 7.25)])
    sites = [Moments.of(part) for part in np.array_split(x, 3)]
    summed = STATS_CODEC.decode_sum(
        np.sum([STATS_CODEC.encode(m.to_vector()) for m in sites], axis=0).tolist(),
        n_terms=3)
    norm = Standardizer.from_moments(Moments.from_vector(summed))
    assert norm.dead.tolist() == [False, True]
    z = norm.transform(np.array([[1005.0, 7.25], [1005.0, 9_000.0]]))
    assert z[0, 1] == 0.0 and z[1, 1] == 0.0
    assert abs(z[0, 0] - 1.0) < 0.05
