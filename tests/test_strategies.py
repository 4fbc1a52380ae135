"""Strategies: every party combines a round alike; the robust ones survive a poisoning site."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from datasites.harness.demo import BUNDLED_LABEL
from fed_tasks.evaluation import detection_metrics
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.site_step import StepInput, initial_weights, personalized
from fed_tasks.spec import JobSpec
from fed_tasks.strategies import strategy_for
from fed_tasks.strategy import pack_update

FEATURES = ("f1", "f2")


def _updates(deltas: list[list[float]], rows: list[int]) -> dict[str, np.ndarray]:
    return {f"s{i}": pack_update(np.asarray(d), 0.5, n)
            for i, (d, n) in enumerate(zip(deltas, rows, strict=True))}


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum"])
def test_a_robust_strategy_ignores_one_far_update_and_any_claimed_row_count(name):
    spec = JobSpec(model="ae", features=FEATURES, strategy=name, min_sites=5)
    honest = [[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1.0, 2.05]]
    poisoned = _updates([*honest, [1000.0, -1000.0]], [100, 120, 80, 90, 10**9])
    total = strategy_for(spec).aggregate(poisoned)
    mean_delta = total[:-2] / total[-1]
    assert np.all(np.abs(mean_delta - [1.0, 2.0]) < 0.15), mean_delta
    fedavg = strategy_for(JobSpec(model="ae", features=FEATURES)).aggregate(poisoned)
    assert abs(fedavg[0] / fedavg[-1]) > 500  # the sum follows the site that claims most rows


def test_an_update_without_a_positive_row_count_is_left_out():
    spec = JobSpec(model="ae", features=FEATURES, strategy="median")
    updates = _updates([[1.0, 1.0], [3.0, 3.0], [2.0, 2.0]], [10, 10, 10])
    updates["s9"] = np.array([5.0, 5.0, 0.0, 0.0])  # no rows
    total = strategy_for(spec).aggregate(updates)
    assert total[-1] == 3 and np.allclose(total[:-2] / total[-1], [2.0, 2.0])


@pytest.mark.parametrize("mode", ["paillier", "secagg"])
@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum"])
def test_the_secure_modes_refuse_a_strategy_that_needs_individual_updates(mode, name):
    with pytest.raises(ValueError, match="needs every site's update in clear"):
        JobSpec(model="ae", features=FEATURES, strategy=name, aggregation=mode, min_sites=4)


def test_fedprox_keeps_each_site_closer_to_the_global_model(partitions, schema):
    """The proximal term is applied at the sites: the first round's update is smaller."""
    norms = {}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 10.0)):
        spec = JobSpec(model="ae", features=schema.features, label_column=schema.label,
                       rounds=1, strategy=strategy, prox_mu=mu)
        sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
        result = FederatedTrainer(spec, sites, progress=False).fit()
        norms[strategy] = float(np.linalg.norm(result.weights - initial_weights(spec)))
    assert norms["fedprox"] < 0.8 * norms["fedavg"], norms


class PoisoningSite(LocalSite):
    """A member site that sends a poisoned update every round (it signs it itself, so no
    signature check can tell)."""

    def __init__(self, *args: Any, attack: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attack = attack
        self.rng = np.random.default_rng(7)

    def step(self, action: str, given: StepInput) -> dict[str, Any]:
        result = super().step(action, given)
        if action != "fit":
            return result
        v = result["vector"]
        n = v[-1]
        delta = v[:-2] / n
        if self.attack == "scaled":
            delta = 10.0 * delta
        elif self.attack == "sign-flipped":
            delta = -10.0 * delta
        else:  # random
            delta = self.rng.normal(0.0, 1.0, delta.shape)
        return {**result, "vector": pack_update(delta, v[-2] / n, int(n))}


@pytest.fixture(scope="module")
def five_institutions(shuttle) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """Real normal shuttle rows at five sites; test anomalies whose every value is a real
    normal value from another row (only the joint structure is broken), which an untrained
    model cannot see (see tests/test_detectors.py)."""
    normal = shuttle[shuttle[BUNDLED_LABEL] == 0].sample(4000, random_state=0)
    normal = normal.reset_index(drop=True)
    rng = np.random.default_rng(0)
    features = [c for c in normal.columns if c != BUNDLED_LABEL]
    anomalies = pd.DataFrame({c: rng.permutation(normal[c].to_numpy())[:400] for c in features})
    anomalies[BUNDLED_LABEL] = 1
    test = pd.concat([normal.iloc[:800], anomalies], ignore_index=True)
    train = normal.iloc[800:]
    return [train.iloc[i::5] for i in range(5)], test


def _pooled_auc(strategy: str, attack: str | None, parts: list[pd.DataFrame],
                test: pd.DataFrame) -> float:
    features = tuple(c for c in test.columns if c != BUNDLED_LABEL)
    spec = JobSpec(model="ae", features=features, label_column=BUNDLED_LABEL, rounds=8,
                   strategy=strategy, min_sites=5)
    sites = [LocalSite(f"s{i}", spec, p, test) for i, p in enumerate(parts[:4])]
    last = (PoisoningSite("s4", spec, parts[4], test, attack=attack) if attack
            else LocalSite("s4", spec, parts[4], test))
    result = FederatedTrainer(spec, [*sites, last], progress=False).fit()
    scores = result.score_samples(test[list(features)].to_numpy(np.float64))
    return detection_metrics(test[BUNDLED_LABEL].to_numpy(), scores)["roc_auc"]


@pytest.fixture(scope="module")
def clean(five_institutions) -> dict[str, float]:
    """Each strategy's pooled ROC-AUC when every site is honest."""
    return {s: _pooled_auc(s, None, *five_institutions)
            for s in ("fedavg", "median", "trimmed-mean", "krum")}


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped", "random"])
def test_robust_aggregation_survives_a_poisoning_site_that_fedavg_does_not(five_institutions,
                                                                           clean, attack):
    poisoned = {s: _pooled_auc(s, attack, *five_institutions) for s in clean}
    assert poisoned["fedavg"] < clean["fedavg"] - 0.05, (clean, poisoned)
    for s in ("median", "trimmed-mean", "krum"):
        assert poisoned[s] >= clean[s] - 0.02, (s, clean, poisoned)


def test_the_sites_combine_a_round_by_the_robust_strategy_themselves(federation, partitions,
                                                                     schema):
    """Each site forms the median of the signed updates itself: the model it evaluates is
    the orchestrator's, and both equal the in-memory run."""
    spec = JobSpec(model="ae", features=schema.features, label_column=schema.label, rounds=2,
                   strategy="median")
    federation.approve_all(federation.submit(spec))
    via_syft = federation.trainer(spec, progress=False)
    result = via_syft.fit()
    local = FederatedTrainer(spec, [LocalSite(s.name, spec, tr, te) for s, (tr, te) in
                                    zip(federation.sites, partitions, strict=True)],
                             progress=False)
    expected = local.fit()
    assert np.allclose(result.weights, expected.weights, atol=1e-6)
    for got, want in zip(via_syft.evaluate(result), local.evaluate(expected), strict=True):
        assert got["roc_auc"] == pytest.approx(want["roc_auc"], abs=1e-9)


@pytest.mark.parametrize("name", ["fedyogi"])  # fedadam differs in one line (fedyogi.py)
def test_a_server_optimizer_trains_and_every_site_holds_its_moments(federation, partitions,
                                                                    schema, name):
    """The moments follow from the released sums alone: in a secure-sum job the sites, who
    open each sum themselves, move to exactly the orchestrator's model."""
    spec = JobSpec(model="ae", features=schema.features, label_column=schema.label, rounds=3,
                   strategy=name, server_lr=0.01, aggregation="secagg")
    federation.approve_all(federation.submit(spec))
    trainer = federation.trainer(spec, progress=False)
    result = trainer.fit()
    assert result.losses[-1] < result.losses[0]
    assert result.state is not None and set(result.state.server) == {"m", "v"}
    for e, (_, test) in zip(trainer.evaluate(result), partitions, strict=True):
        ours = result.score_samples(test[list(schema.features)].to_numpy(np.float64))
        want = detection_metrics(test[schema.label].to_numpy(), ours)["roc_auc"]
        assert e["roc_auc"] == pytest.approx(want, abs=1e-6)  # the site's model is ours


def test_each_site_keeps_a_personalized_copy_and_reports_both(partitions, schema):
    spec = JobSpec(model="ae", features=schema.features, label_column=schema.label, rounds=3,
                   personalize_epochs=3, target_fpr=0.05)
    sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
    trainer = FederatedTrainer(spec, sites, progress=False)
    result = trainer.fit()
    for e, (_, te) in zip(trainer.evaluate(result), partitions, strict=True):
        own = e["personalized"]
        assert own["roc_auc"] is not None
        assert own["tp"] + own["fp"] + own["fn"] + own["tn"] == len(te)
    # the copy is the global model fine-tuned on the site's own rows: it fits them better
    train = partitions[1][0]
    x = result.norm.transform(train[list(schema.features)].to_numpy(np.float64))
    before = np.median(result.model().score_samples(x))
    after = np.median(personalized(spec, result.model(), x).score_samples(x))
    assert after < 0.97 * before, (before, after)
    with pytest.raises(ValueError, match="personalization fine-tunes a model trained in"):
        JobSpec(model="pca", features=schema.features, personalize_epochs=2)


def test_scaffold_sites_equal_in_memory_and_keep_their_control_variate_on_disk(
        federation, partitions, schema):
    """A datasite reloads its model state from its directory on every call, as after a
    restart; its SCAFFOLD variate c_i lives there (private, owner-only), so the run through
    the datasites equals the in-memory one, round by round."""
    import stat

    from datasites.runtime.site_entry import _model_path
    from fed_tasks.site_state import SiteModelState

    spec = JobSpec(model="ae", features=schema.features, label_column=schema.label, rounds=3,
                   strategy="scaffold")
    federation.approve_all(federation.submit(spec))
    result = federation.trainer(spec, progress=False).fit()
    local = FederatedTrainer(spec, [LocalSite(s.name, spec, tr, te) for s, (tr, te) in
                                    zip(federation.sites, partitions, strict=True)],
                             progress=False).fit()
    assert np.allclose(result.weights, local.weights, atol=1e-6)
    assert result.losses[-1] < result.losses[0]
    assert result.state is not None and np.linalg.norm(result.state.server["c"]) > 0
    path = _model_path(federation.sites[0].directory, spec)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = SiteModelState.load(spec, initial_weights(spec), path)
    assert np.linalg.norm(kept.private["control"]) > 0
    assert kept.reply is not None and set(kept.reply) <= {"round", "contribution",
                                                           "audit_head"}  # what left
