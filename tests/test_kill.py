"""Kill tests: Ctrl-C (SIGINT) and SIGKILL during provisioning and during a round of
``fedsyft demo --keep-sites DIR`` leave, per site, either nothing or a complete site.

Complete means: it opens with ``Datasite.open`` and its owner's password (which also checks
the privacy ledger and the policy against the signed audit log, so they agree), and its
audit log verifies. A temporary ``.NAME.provisioning-…`` directory is never taken for a
site, and the next demo names it. The four runs are real subprocesses started together
(each spends most of its time importing syft), so the module stays well under 90 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from datasites.runtime.site_files import SiteDirectoryError, is_staging, read_site_info

BIN = Path(sys.executable).parent / "fedsyft"
OWNER_PW = "owner-pass-7731"
OFFICER_PW = "officer-pass-5820"
CASES = [("provisioning", signal.SIGINT), ("provisioning", signal.SIGKILL),
         ("round", signal.SIGINT), ("round", signal.SIGKILL)]
DEADLINE = 150.0  # seconds a run may take to reach its kill point (a hang fails the test)


def _staging(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if is_staging(p)] if root.exists() else []


def _fit_executed(root: Path) -> bool:
    log = root / "site-1" / "audit.jsonl"
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if entry.get("action") == "function_executed" and \
                (entry.get("params") or {}).get("action") == "fit":
            return True
    return False


def _run_and_kill(table: Path, root: Path, phase: str, sig: signal.Signals) -> dict:
    """Start the demo, wait for ``phase``, send ``sig``; what was seen and the exit code."""
    env = {**os.environ, "FEDSYFT_OWNER_PASSWORD": OWNER_PW,
           "FEDSYFT_OFFICER_PASSWORD": OFFICER_PW, "TQDM_DISABLE": "1"}
    cmd = [str(BIN), "demo", "--data", str(table), "--sites", "2", "--rounds", "40",
           "--epsilon", "5", "--keep-sites", str(root)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reached = _staging if phase == "provisioning" else _fit_executed
    start = time.monotonic()
    try:
        while not reached(root):
            if proc.poll() is not None or time.monotonic() - start > DEADLINE:
                out = proc.communicate()[0].decode(errors="replace")
                return {"reached": False, "code": proc.returncode, "output": out}
            time.sleep(0.05)
        if phase == "provisioning":
            time.sleep(0.5)  # into the build: accounts, dataset, ...
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"reached": True, "code": proc.returncode, "output": out}


@pytest.fixture(scope="module")
def runs(shuttle_small, tmp_path_factory):
    """All four kill runs, started together; (phase, signal) → (root, result)."""
    base = tmp_path_factory.mktemp("kill")
    table = base / "table.csv"
    # 2,000 rows: 2 sites of ~700 training rows, enough for DP-SGD's noise (the demo refuses
    # a DP job whose noise would swamp the signal, fed_tasks/dp_usefulness.py)
    shuttle_small.head(2000).to_csv(table, index=False)
    roots = {case: base / f"{case[0]}-{case[1].name}" for case in CASES}
    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {case: pool.submit(_run_and_kill, table, roots[case], *case)
                   for case in CASES}
        return {case: (roots[case], fut.result()) for case, fut in futures.items()}


def _assert_complete_site(directory: Path) -> None:
    from datasites.governance.audit import AuditLogCorrupt, verify
    from datasites.runtime.datasite import Datasite

    info = read_site_info(directory)
    try:
        site = Datasite.open(directory, info.email("data_owner"), OWNER_PW)
    except AuditLogCorrupt as exc:
        # SIGKILL between an entry and its signed head: the owner's repair signs the tail
        assert "fedsyft site repair" in str(exc)
        site = Datasite.open(directory, info.email("data_owner"), OWNER_PW, repair=True)
    try:
        assert site.privacy_spent()["epsilon_spent"] >= 0
    finally:
        site.close()
    report = verify(directory)
    assert report.ok, report.problem


def _cases() -> list:
    return [pytest.param(c, id=f"{c[0]}-{c[1].name}") for c in CASES]


@pytest.mark.parametrize("case", _cases())
def test_kill_leaves_nothing_or_a_complete_site(runs, case):
    from datasites.runtime.datasite import Datasite

    root, result = runs[case]
    assert result["reached"], f"the run never reached {case[0]}: {result['output'][-2000:]}"
    assert result["code"] != 0
    entries = sorted(root.iterdir())
    for path in entries:
        if is_staging(path):  # only a kill leaves one; it is never taken for a site
            assert case[1] == signal.SIGKILL, f"{path} left after {case[1].name}"
            with pytest.raises(SiteDirectoryError, match="interrupted provisioning"):
                Datasite.open(path, "owner@site-1.site", OWNER_PW)
        else:
            _assert_complete_site(path)
    if case[0] == "round":  # the round started, so every site was complete and kept
        assert {p.name for p in entries} >= {"site-1", "site-2"}


def test_the_next_demo_names_a_leftover(runs):
    root, _ = runs[("provisioning", signal.SIGKILL)]
    left = _staging(root)
    assert left, "SIGKILL during provisioning left no temporary directory"
    before = sorted(p.name for p in root.iterdir())
    done = subprocess.run([str(BIN), "demo", "--keep-sites", str(root)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted provisioning" in lines[0]
    assert str(left[0]) in lines[0] and "Traceback" not in done.stderr + done.stdout
    assert sorted(p.name for p in root.iterdir()) == before
