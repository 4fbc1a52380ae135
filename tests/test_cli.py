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
    assert record.status == "approved" and record.released == 1 + 2 + 1  # stats, 2 fits, eval
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
