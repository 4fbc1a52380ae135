"""DP that keeps the detector useful, or says plainly that it cannot (fed_tasks/dp_usefulness.py).

The noise-to-signal ratio is judged before training; the demo and the sites refuse a job whose
noise would swamp its signal (or run it with a warning where the owner's policy says so);
``--epsilon`` alone picks the DP unit that keeps a small federation's model useful; and a DP
model that ends up worse than the untrained one is flagged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasites.governance.policy import DatasetPolicy
from fed_tasks import dp_step, dp_usefulness
from fed_tasks.evaluation import noise_check, noise_warning
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec

FEDSYFT = Path(sys.executable).parent / "fedsyft"
FEATURES = tuple(f"f{i}" for i in range(1, 10))


def _spec(**kw) -> JobSpec:
    return JobSpec(features=FEATURES, label_column="anomaly", **kw)


@pytest.mark.parametrize("aggregation", ["plain", "secagg"])
def test_the_estimate_is_the_noise_the_sites_really_add(aggregation):
    """The ratio predicted from the spec equals the noise norm measured on the average of
    the sites' released (clipped, noised) updates, over the largest signal, the clip."""
    spec = _spec(dp_epsilon=5.0, rounds=3, dp_clip=0.5, aggregation=aggregation, min_sites=3)
    predicted = dp_usefulness.estimate(spec).ratio
    p, shares = dp_usefulness.parameters(spec), dp_step.noise_shares(spec)
    assert (p, shares) == (1837, 1 if aggregation == "plain" else 3)
    rng = np.random.default_rng(7)
    measured = []
    for _ in range(20):
        released = [dp_step.privatize_update(spec, np.zeros(p), shares, rng=rng)
                    for _ in range(spec.min_sites)]
        measured.append(np.linalg.norm(np.mean(released, axis=0)) / spec.dp_clip)
    assert np.mean(measured) == pytest.approx(predicted, rel=0.03)


def test_per_row_noise_is_judged_with_the_site_rows():
    """DP-SGD's noise is averaged over a batch: at the demo's site sizes it is small, at a
    few dozen rows it swamps the step; only the site (or the demo) knows its rows."""
    spec = _spec(dp_epsilon=1.0, dp_sgd=True, trim=0.0, rounds=10)
    assert dp_usefulness.estimate(spec) is None  # no rows: nothing to judge on this side
    big, small = dp_usefulness.estimate(spec, 15_000), dp_usefulness.estimate(spec, 60)
    assert big.ratio < 0.1 < 1 < small.ratio
    policy = DatasetPolicy()
    assert policy.violations(spec, rows=15_000) == []
    found = " ".join(policy.violations(spec, rows=60))
    assert f"noise-to-signal ratio {small.ratio:.3g}" in found and "more rows per site" in found
    # the epsilon it names is enough, and not by far
    eps = float(found.split("would work: epsilon ")[1].split(" or more")[0])
    assert dp_usefulness.estimate(spec.model_copy(update={"dp_epsilon": eps}), 60).ratio <= 1
    assert dp_usefulness.estimate(spec.model_copy(update={"dp_epsilon": 0.9 * eps}),
                                  60).ratio > 1


def test_sum_detectors_keep_their_signal_at_small_epsilon():
    for model in ("pca", "hbos"):
        spec = _spec(model=model, dp_epsilon=0.5, target_fpr=0.05)
        assert dp_usefulness.estimate(spec, 10_000).ratio < 0.5, model
        assert dp_usefulness.useless(spec, 10_000) is None


def test_the_limit_and_the_answer_to_it_are_the_owners():
    spec = _spec(dp_epsilon=3.0, rounds=10, aggregation="secagg", min_sites=3)
    ratio = dp_usefulness.estimate(spec).ratio
    assert ratio > dp_usefulness.USEFUL_RATIO
    refused = " ".join(DatasetPolicy().violations(spec))
    for words in (f"noise-to-signal ratio {ratio:.3g}", "exceeds 1",
                  "sites in every aggregate with a secure sum", "sample-level DP-SGD"):
        assert words in refused, words
    assert DatasetPolicy().warnings(spec) == []
    assert DatasetPolicy(max_noise_ratio=ratio * 1.01).violations(spec) == []
    warn = DatasetPolicy(noisy_dp="warn")
    assert warn.violations(spec) == []
    assert "runs it anyway" in warn.warnings(spec)[0]
    # a remedy it names does work: that many sites bring the ratio under the limit
    sites = int(refused.split("at least ")[1].split(" sites")[0].replace(",", ""))
    enough = spec.model_copy(update={"min_sites": sites})
    assert dp_usefulness.estimate(enough).ratio <= 1 < dp_usefulness.estimate(
        spec.model_copy(update={"min_sites": sites - 1})).ratio


def test_epsilon_alone_picks_the_unit_that_keeps_the_model_useful():
    small = _spec(dp_epsilon=3.0, rounds=10, min_sites=3)
    chosen, why = dp_usefulness.default_unit(small)
    assert chosen.dp_sgd and chosen.trim == 0.0 and "sample-level DP-SGD" in why
    assert chosen.job_id == small.job_id
    # a federation big enough for client-level DP keeps it (no word said)
    large = _spec(dp_epsilon=10.0, rounds=1, aggregation="secagg", min_sites=1000)
    assert dp_usefulness.estimate(large).ratio < 1
    assert dp_usefulness.default_unit(large) == (large, None)
    # a model DP-SGD cannot train keeps client-level DP, and the policy refuses its noise
    vae = _spec(model="vae", dp_epsilon=3.0, min_sites=3)
    assert dp_usefulness.default_unit(vae) == (vae, None)
    assert "swamp" in " ".join(DatasetPolicy().violations(vae))


def _demo(*args: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "COLUMNS": "200"}
    return subprocess.run([str(FEDSYFT), "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


@pytest.mark.parametrize("args", [["--dp-unit", "site"], ["--model", "vae"],
                                  ["--dp-unit", "site", "--adaptive-clip"]],
                         ids=["site-unit", "vae", "adaptive-clip"])
def test_the_demo_refuses_noise_that_swamps_the_signal_before_any_site_exists(args, tmp_path):
    proc = _demo("--epsilon", "3", *args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert "noise-to-signal ratio" in error[0] and "exceeds 1" in error[0]
    assert "sites in every aggregate" in error[0]
    assert "provisioned" not in proc.stdout


def test_the_demo_epsilon_alone_trains_per_row_and_reports_the_noise(shuttle_small, tmp_path):
    table = tmp_path / "rows.csv"
    shuttle_small.to_csv(table, index=False)
    report = tmp_path / "report.json"
    proc = _demo("--data", str(table), "--epsilon", "3", "--rounds", "2", "--report",
                 str(report), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trains with sample-level DP-SGD" in proc.stdout
    doc = json.loads(report.read_text())
    assert doc["dp"] == "dp_sgd" and 0 < doc["noise_to_signal"] < 1
    check = doc["noise_check"]
    assert 0.5 < check["untrained_roc_auc"] <= 1 and 0 <= check["roc_auc"] <= 1
    assert "expected noise-to-signal ratio of a release" in proc.stdout
    assert f"ROC-AUC {check['roc_auc']:.3f} vs {check['untrained_roc_auc']:.3f}" in proc.stdout
    assert all("untrained" in row for row in doc["per_site"])


def test_a_dp_model_worse_than_the_untrained_one_is_flagged(partitions, schema):
    """Client-level DP with a huge clip on 3 sites (a job the default policy refuses; an
    owner whose policy only warns may run it): the noise wrecks the autoencoder, and the
    sites' held-out metrics say so instead of handing it over as a detector."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=2,
                   dp_epsilon=0.5, dp_clip=100.0, min_sites=3)
    assert dp_usefulness.useless(spec, None) is not None
    sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
    trainer = FederatedTrainer(spec, sites, progress=False)
    per_site = trainer.evaluate(trainer.fit())
    check = noise_check(per_site)
    assert check["worse_than_untrained"] and check["untrained_roc_auc"] > 0.9
    assert check["roc_auc"] < check["untrained_roc_auc"] - 0.1
    assert set(check["sites_below"]) <= {"s0", "s1", "s2"} and check["sites_below"]
    line = noise_warning(check)
    assert line.startswith("WARNING") and "do not deploy it" in line
    # the same job without DP learns: no flag
    plain = spec.model_copy(update={"dp_epsilon": None})
    sites = [LocalSite(f"s{i}", plain, tr, te) for i, (tr, te) in enumerate(partitions)]
    trainer = FederatedTrainer(plain, sites, progress=False)
    assert all("untrained" not in row for row in trainer.evaluate(trainer.fit()))
