"""``fedsyft demo`` as a user runs it: a real subprocess, a real CSV, real datasites."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BIN = Path(sys.executable).parent / "fedsyft"
OWNER_PW = "kept-owner-pass-31"


def _run(*args: str, timeout: int = 600, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, shuttle_small):
    """One real `fedsyft demo` (2 sites, 2 rounds) whose site directories are kept."""
    tmp = tmp_path_factory.mktemp("demo")
    csv = tmp / "readings.csv"
    shuttle_small.rename(columns={"anomaly": "is_fault"}).to_csv(csv, index=False)
    report, kept = tmp / "out" / "report.json", tmp / "kept"
    env = {"FEDSYFT_OWNER_PASSWORD": OWNER_PW, "FEDSYFT_OFFICER_PASSWORD": ""}  # officer: random
    proc = _run("demo", "--data", str(csv), "--label-column", "is_fault", "--sites", "2",
                "--rounds", "2", "--seed", "3", "--report", str(report),
                "--keep-sites", str(kept), env=env)
    return SimpleNamespace(proc=proc, report=report, kept=kept)


def test_demo_on_any_labelled_csv_writes_the_report(demo_run):
    proc, report = demo_run.proc, demo_run.report
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "federated" in proc.stdout and "pooled" in proc.stdout
    data = json.loads(report.read_text())
    for key in ("federated", "centralized", "local_only"):
        assert 0.5 < data[key]["roc_auc"] <= 1.0 and 0.0 < data[key]["pr_auc"] <= 1.0
    assert len(data["per_site"]) == 2 and data["aggregation"] == "plain"
    assert isinstance(data["seconds"], float) and data["rounds"] == 2
    # the calibrated threshold: per-site counts from the sites, pooled by summing
    assert data["target_fpr"] == 0.05 and data["threshold"] is not None
    fed = data["federated"]
    for k in ("tp", "fp", "fn", "tn"):
        assert fed[k] == sum(r[k] for r in data["per_site"])
    assert sum(fed[k] for k in ("tp", "fp", "fn", "tn")) == sum(r["n_test"]
                                                                for r in data["per_site"])
    assert all(0.0 <= r["f1"] <= 1.0 for r in data["per_site"]) and 0.0 < fed["f1"] <= 1.0
    assert fed["f1"] == pytest.approx(2 * fed["tp"] / (2 * fed["tp"] + fed["fp"] + fed["fn"]))
    assert "F1 at the threshold" in proc.stdout and "alarm threshold" in proc.stdout
    assert data["dropped_columns"] == {"constant": [], "user": []}


def test_demo_keeps_sites_for_the_owner_and_officer_cli(demo_run):
    """--keep-sites: passwords from the environment or printed once, never in a file."""
    from datasites.governance.compliance import AuditorSession

    proc, site_dir = demo_run.proc, demo_run.kept / "site-1"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (site_dir / "site.json").exists() and (demo_run.kept / "site-2" / "site.json").exists()
    assert OWNER_PW not in proc.stdout and "$FEDSYFT_OWNER_PASSWORD" in proc.stdout
    printed = re.search(r"site-1: data owner (\S+) password \S+ ; compliance officer (\S+) "
                        r"password (\S+)", proc.stdout)
    assert printed, proc.stdout
    officer_email, officer_pw = printed.group(2), printed.group(3)
    for path in demo_run.kept.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert OWNER_PW.encode() not in data and officer_pw.encode() not in data, path
    officer = AuditorSession.login(site_dir, officer_email, officer_pw)
    (record,) = officer.requests()
    # stats, 2 fits, 2 calibration passes, evaluation
    assert record.status == "approved" and record.released == 1 + 2 + 2 + 1
    assert officer.verify().ok
    verify = _run("audit", "verify", "--site", str(site_dir))
    assert verify.returncode == 0 and "hash chain intact" in verify.stdout
    listed = _run("requests", "list", "--site", str(site_dir),
                  env={"FEDSYFT_OWNER_PASSWORD": OWNER_PW})
    assert listed.returncode == 0, listed.stderr
    assert record.request_id in listed.stdout and "approved" in listed.stdout
    again = _run("demo", "--keep-sites", str(demo_run.kept))
    assert again.returncode == 2 and "must be an empty or new directory" in again.stderr


def test_demo_bad_input_exits_2_with_a_named_problem(tmp_path, shuttle_small):
    csv = tmp_path / "t.csv"
    shuttle_small.head(100).to_csv(csv, index=False)
    proc = _run("demo", "--data", str(csv), "--label-column", "label")
    assert proc.returncode == 2
    assert "label column 'label' not in" in proc.stderr
    proc = _run("demo", "--data", str(tmp_path / "missing.csv"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_one_table_per_site_any_model_constant_and_dropped_columns(tmp_path, shuttle_small):
    """`--data` once per institution (no split), `--model pca`, a column constant in every
    table (dropped, named in a warning and the report), one constant at one site only (kept)
    and a text column left out with --drop-columns: end to end through real datasites."""
    a = shuttle_small.head(500).assign(unit=7, f5=0, ward="icu")
    b = shuttle_small.iloc[500:1100].assign(unit=7, ward="er")
    paths = [tmp_path / "clinic-a.csv", tmp_path / "clinic-b.csv"]
    for frame, path in zip((a, b), paths, strict=True):
        frame.to_csv(path, index=False)
    report = tmp_path / "report.json"
    proc = _run("demo", "--data", str(paths[0]), "--data", str(paths[1]), "--model", "pca",
                "--drop-columns", "ward", "--target-fpr", "0.1", "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: dropped feature columns ['unit']" in proc.stdout
    data = json.loads(report.read_text())
    assert data["model"] == "pca" and data["sites"] == 2 and data["target_fpr"] == 0.1
    assert data["dropped_columns"] == {"constant": ["unit"], "user": ["ward"]}
    assert data["features"] == [f"f{i}" for i in range(1, 10)]  # f5 kept: it varies in b
    rows = data["site_rows"]
    assert [(r["data"], r["train"] + r["test"]) for r in rows] == [(str(paths[0]), 500),
                                                                   (str(paths[1]), 600)]
    assert data["federated"]["roc_auc"] > 0.5 and data["threshold"] is not None
    assert all(r["f1"] is not None for r in data["per_site"])


def test_results_table_shows_undefined_metrics_as_a_dash():
    """A one-class test split has no ROC-AUC; a site with no alarm has no precision."""
    from rich.console import Console

    from datasites.cli.main import results_table

    site = {"site": "s1", "roc_auc": None, "pr_auc": None, "f1": None}
    pooled = {"roc_auc": 0.91, "pr_auc": 0.5, "f1": 0.4}
    report = {"sites": 1, "rounds": 3, "rounds_completed": 2, "model": "vae",
              "aggregation": "plain", "threshold": 1.5, "per_site": [site],
              "federated": pooled, "centralized": {**pooled, "per_site": [site]},
              "local_only": {**pooled, "per_site": [site]}}
    console = Console(width=200, record=True)
    console.print(results_table(report))
    text = console.export_text()
    assert "- / - / -" in text and "0.910 / 0.500 / 0.40" in text
    assert "vae, 1 sites, 2 of 3 rounds" in text


def test_the_cli_defaults_are_the_demos():
    from datasites.cli import main
    from datasites.harness.demo import DemoConfig

    cfg = DemoConfig()
    assert (cfg.rounds, cfg.patience, cfg.target_fpr) == (main.DEMO_ROUNDS, main.DEMO_PATIENCE,
                                                          0.05)


def test_series_demo_on_two_nab_devices(tmp_path):
    """`--model lstm-ae --time-column`: two real NAB server-CPU series (1000x apart in
    scale), one device each, each evaluated on its whole series; no centralized model."""
    import pandas as pd

    nab = Path(__file__).parents[1] / "datasites" / "data" / "nab"
    paths = []
    for name, start in (("ec2_cpu_utilization_fe7f93", 500), ("rds_cpu_utilization_e47b3b", 700)):
        path = tmp_path / f"{name}.csv"
        rows = pd.read_csv(nab / f"{name}.csv.gz").iloc[start:start + 600]
        rows.sample(frac=1.0, random_state=0).to_csv(path, index=False)  # order: by time
        paths.append(path)
    report = tmp_path / "series.json"
    proc = _run("demo", "--model", "lstm-ae", "--data", str(paths[0]), "--data", str(paths[1]),
                "--time-column", "timestamp", "--rounds", "2", "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["model"] == "lstm-ae" and data["time_column"] == "timestamp"
    assert data["features"] == ["value"] and data["sites"] == 2
    assert [(r["train"], r["test"]) for r in data["site_rows"]] == [(600, 600), (600, 600)]
    for row in data["per_site"]:
        assert isinstance(row["roc_auc"], float) and 0.0 <= row["roc_auc"] <= 1.0
        assert row["n_test"] == 600
    assert data["centralized"] is None and "invent transitions" in data["centralized_why_not"]
    assert len(data["local_only"]["per_site"]) == 2
    assert isinstance(data["federated"]["roc_auc"], float)
    fed = data["federated"]
    assert sum(fed[k] for k in ("tp", "fp", "fn", "tn")) == 1200
    said = " ".join(proc.stdout.split())
    assert "local-only" in said and "centralized: not applicable" in said


def test_series_results_table_has_no_centralized_row():
    from rich.console import Console

    from datasites.cli.main import results_table

    site = {"site": "s1", "roc_auc": 0.7, "pr_auc": 0.4}
    report = {"sites": 1, "rounds": 2, "model": "lstm-ae", "aggregation": "plain",
              "time_column": "t", "per_site": [site], "federated": site, "centralized": None,
              "centralized_why_not": "not applicable to series",
              "local_only": {**site, "per_site": [site]}}
    console = Console(width=200, record=True)
    console.print(results_table(report))
    text = " ".join(console.export_text().split())
    assert "whole private series" in text and "centralized: not applicable" in text
    assert "│ centralized" not in text and "local-only" in text


def test_train_lines_and_report_cope_with_undefined_metrics():
    """`fedsyft train`: a site with a one-class test split has no ROC-AUC ("-", left out of
    the mean); F1 at the threshold is shown when the job has one."""
    from types import SimpleNamespace as NS

    from datasites.cli.deploy import _train_report, site_line
    from datasites.harness.demo import _with_threshold_metrics
    from fed_tasks.spec import JobSpec

    rows = _with_threshold_metrics([
        {"site": "a", "roc_auc": None, "pr_auc": None, "tp": 0, "fp": 2, "fn": 0, "tn": 98,
         "n_test": 100},
        {"site": "b", "roc_auc": 0.8, "pr_auc": 0.5, "tp": 3, "fp": 1, "fn": 1, "tn": 45,
         "n_test": 50}])
    assert site_line(rows[0]).split() == ["a", "ROC-AUC", "-", "PR-AUC", "-", "F1", "0.00",
                                          "at", "the", "threshold", "(100", "test", "rows)"]
    assert "ROC-AUC 0.800  PR-AUC 0.500  F1 0.75 at the threshold" in site_line(rows[1])
    assert "F1" not in site_line({"site": "c", "roc_auc": 0.9, "pr_auc": 0.7, "n_test": 9})
    result = NS(losses=[0.5], rounds_completed=1, stop_reason="", round_seconds=[1.0], skipped=[],
                weights=__import__("numpy").zeros(2))
    out = _train_report(JobSpec(features=("x",)), NS(path="f.toml", site=[1, 2]), result,
                        rows, 1.0)
    assert out["federated"]["roc_auc_mean"] == 0.8 and out["federated"]["tp"] == 3
    assert out["federated"]["f1"] == pytest.approx(6 / 10)  # pooled: tp 3, fp 3, fn 1


def test_demo_selects_a_model_with_a_robust_strategy_and_personalized_copies(tmp_path,
                                                                               shuttle_small):
    """--model auto --strategy median --personalize: every candidate trained under one
    approval per site, the chosen one named, each site's personalized metrics reported."""
    csv, report = tmp_path / "t.csv", tmp_path / "r.json"
    shuttle_small.iloc[:1500].to_csv(csv, index=False)
    proc = _run("demo", "--data", str(csv), "--model", "auto", "--strategy", "median",
                "--personalize", "1", "--rounds", "2", "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.read_text())
    chosen = [c for c in data["selection"] if c["chosen"]]
    assert len(chosen) == 1 and data["chosen_model"] == chosen[0]["model"]
    assert [c["model"] for c in data["selection"]] == ["pca", "hbos", "ae", "iforest"]
    assert f"auto -> {data['chosen_model']}" in proc.stdout and "<- chosen" in proc.stdout
    assert data["strategy"] == "median"
    if data["chosen_model"] == "ae":  # only a model trained in rounds has a copy to tune
        assert all("personalized" in s for s in data["per_site"])


@pytest.mark.parametrize("aggregation, strategy", [("secagg", "fedprox")])
def test_demo_with_buffered_rounds_through_the_datasites(tmp_path, shuttle_small,
                                                         aggregation, strategy):
    """--async 2 of 3 sites: each round's aggregate holds at least two updates, any stale
    one is weighted as FedBuff says (in secagg by its own site, before masking), and every
    site evaluates the final model (so each one verified every buffered aggregate itself).
    Plain and paillier buffering run the same site entry point in-process
    (tests/test_async_rounds.py); the transport through syft is the same for every mode."""
    csv, report = tmp_path / "t.csv", tmp_path / "r.json"
    shuttle_small.iloc[:1500].to_csv(csv, index=False)
    proc = _run("demo", "--data", str(csv), "--sites", "3", "--async", "2", "--strategy",
                strategy, "--aggregation", aggregation, "--rounds", "3", "--report",
                str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.read_text())
    rounds: dict[int, list[dict]] = {}
    for b in data["buffered"]:
        rounds.setdefault(b["round"], []).append(b)
        assert b["weight"] == pytest.approx((1 + b["staleness"]) ** -0.5, abs=3e-3)
    assert sorted(rounds) == [1, 2, 3] and all(len(c) >= 2 for c in rounds.values())
    # the threshold's calibration after the rounds waits for a site's last (unused) call
    assert not [s for s in data["skipped"] if s["action"] != "fit"], data["skipped"]
    assert len(data["per_site"]) == 3 and data["strategy"] == strategy
    assert data["aggregation"] == aggregation
    assert 0.5 < data["federated"]["roc_auc"] <= 1.0
