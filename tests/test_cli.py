"""``fedsyft demo`` as a user runs it: a real subprocess, a real CSV, real datasites."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "fedsyft"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)


def test_demo_on_any_labelled_csv_writes_the_report(tmp_path, shuttle_small):
    csv = tmp_path / "readings.csv"
    shuttle_small.rename(columns={"anomaly": "is_fault"}).to_csv(csv, index=False)
    report = tmp_path / "out" / "report.json"
    proc = _run("demo", "--data", str(csv), "--label-column", "is_fault", "--sites", "2",
                "--rounds", "2", "--seed", "3", "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "federated" in proc.stdout and "pooled" in proc.stdout
    data = json.loads(report.read_text())
    for key in ("federated", "centralized", "local_only"):
        assert 0.5 < data[key]["roc_auc"] <= 1.0 and 0.0 < data[key]["pr_auc"] <= 1.0
    assert len(data["per_site"]) == 2 and data["aggregation"] == "plain"
    assert isinstance(data["seconds"], float) and data["rounds"] == 2


def test_demo_bad_input_exits_2_with_a_named_problem(tmp_path, shuttle_small):
    csv = tmp_path / "t.csv"
    shuttle_small.head(100).to_csv(csv, index=False)
    proc = _run("demo", "--data", str(csv), "--label-column", "label")
    assert proc.returncode == 2
    assert "label column 'label' not in" in proc.stderr
    proc = _run("demo", "--data", str(tmp_path / "missing.csv"))
    assert proc.returncode == 2 and "not found" in proc.stderr
