"""No code path prints a secret (issue 11): the failures that used to print the owners' and
officers' passwords through rich's dump of local variables, forced through the real CLI.

Each runs ``.venv/bin/fedsyft`` as a subprocess (typer's exception handling only runs
there, not under CliRunner) with known passwords in FEDSYFT_OWNER_PASSWORD /
FEDSYFT_OFFICER_PASSWORD, and asserts exit code 2, one ``error:`` line naming the problem,
no traceback, and no password anywhere in stdout or stderr. Also: owner passwords have the
officers' minimum length, and a failed audit export is not logged as done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from datasites.governance.accounts import Account, Role, Secret, new_password
from datasites.governance.audit import load_entries

BIN = Path(sys.executable).parent / "fedsyft"
OWNER_PW = "owner-Secret-5521"
OFFICER_PW = "officer-Secret-8830"
SECRETS = (OWNER_PW, OFFICER_PW)
ENV = {"FEDSYFT_OWNER_PASSWORD": OWNER_PW, "FEDSYFT_OFFICER_PASSWORD": OFFICER_PW}


def _run(*args: object, env: dict[str, str] | None = None, timeout: int = 600
         ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "80", **(env or ENV)})


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line (the last; progress bars may precede it) holding
    ``needles``, no traceback, no secret."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for secret in SECRETS:
        assert secret not in out, f"a password reached the screen: {out[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory, shuttle):
    """360 rows of the bundled table (both classes), so that a whole demo takes seconds."""
    rows = [g.sample(n=300 if label == 0 else 60, random_state=0)
            for label, g in shuttle.groupby("anomaly")]
    path = tmp_path_factory.mktemp("csv") / "small.csv"
    import pandas as pd

    pd.concat(rows).sample(frac=1.0, random_state=1).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def late_report_failure(tmp_path_factory, small_csv):
    """A whole demo whose report cannot be written at the very end (/dev/full: the check
    before the work passes, the write fails), keeping its sites with known passwords."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    kept = tmp_path_factory.mktemp("secrets") / "kept"
    proc = _run("demo", "--data", small_csv, "--sites", "2", "--rounds", "1",
                "--keep-sites", kept, "--report", "/dev/full")
    return SimpleNamespace(proc=proc, kept=kept)


# ---- the three failure paths of issue 11 -------------------------------------------------------
def test_unwritable_report_is_one_line_without_passwords(late_report_failure, small_csv,
                                                         tmp_path):
    _one_line_error(late_report_failure.proc, "cannot write the report to --report /dev/full",
                    "No space left on device")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    early = _run("demo", "--data", small_csv, "--sites", "2", "--rounds", "1",
                 "--keep-sites", tmp_path / "kept", "--report", blocker / "report.json")
    _one_line_error(early, f"--report {blocker / 'report.json'}", "is not a directory")
    assert not (tmp_path / "kept").exists()  # checked before any work


def test_corrupt_gzip_table_is_one_line_without_passwords(tmp_path):
    from datasites.harness.demo import BUNDLED_TABLE

    data = bytearray(BUNDLED_TABLE.read_bytes())
    for i in range(2000, 2400):  # a damaged deflate stream (zlib.error)
        data[i] ^= 0x5A
    corrupt, truncated = tmp_path / "corrupt.csv.gz", tmp_path / "truncated.csv.gz"
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(BUNDLED_TABLE.read_bytes()[:3000])  # EOFError
    for path in (corrupt, truncated):
        proc = _run("demo", "--data", path, "--sites", "2", "--rounds", "1",
                    "--keep-sites", tmp_path / f"kept-{path.stem}")
        _one_line_error(proc, f"table {path} is not a readable compressed CSV")


def test_malformed_policy_is_one_line_without_passwords(late_report_failure):
    site = late_report_failure.kept / "site-1"
    assert (site / "site.json").exists(), late_report_failure.proc.stderr[-2000:]
    policy = site / "policy.json"
    original = policy.read_text()
    policy.write_text('{"datasets": {"records": {"max_rounds": "x"}}')  # truncated JSON
    try:  # (other malformed files: tests/test_ledger_integrity.py, in-process)
        _one_line_error(_run("requests", "list", "--site", site),
                        f"policy file {policy} is unreadable", "fedsyft site repair")
    finally:
        policy.write_text(original)


def test_secrets_hide_in_every_repr():
    secret = Secret("hunter2-hunter2")
    account = Account("a@b.org", Role.DATA_OWNER, "plain-password-1")
    assert isinstance(account.password, Secret) and account.password == "plain-password-1"
    for shown in (repr(secret), repr([secret]), repr({"pw": secret}), repr(account),
                  repr(dataclasses.astuple(account)), f"{secret!r}", repr(new_password())):
        assert "hunter2" not in shown and "plain-password" not in shown
    assert f"{secret}" == "hunter2-hunter2" and type(secret.reveal()) is str

    from datasites.cli.main import app

    assert app.pretty_exceptions_show_locals is False


# ---- owners' passwords: the officers' minimum length ------------------------------------------
def test_weak_owner_password_is_refused_before_anything_is_built(tmp_path, partitions,
                                                                 schema):
    for var in ENV:
        proc = _run("demo", "--keep-sites", tmp_path / "kept", env={**ENV, var: "short"})
        _one_line_error(proc, f"{var} must have at least 8 characters")
        assert not (tmp_path / "kept").exists()
    from datasites.errors import ProvisioningError
    from datasites.runtime.datasite import Datasite

    train, test = partitions[0]
    with pytest.raises(ProvisioningError, match="owner_password must have at least 8"):
        Datasite.provision("weak-site", tmp_path / "weak", train=train, test=test,
                           schema=schema, scientist=Account("ds@x.org", Role.DATA_SCIENTIST,
                                                            "scientist-pass-1"),
                           owner_password="1234567")
    assert not (tmp_path / "weak").exists()


# ---- a failed audit export is not logged as done ------------------------------------------
def test_failed_audit_export_is_one_line_and_not_logged(late_report_failure, tmp_path):
    site = late_report_failure.kept / "site-2"
    before = load_entries(site)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, why in ((blocker / "audit.json", "is not a directory"),
                     (tmp_path / "missing" / "audit.json", "does not exist"),
                     (tmp_path, "is a directory")):
        proc = _run("audit", "export", "--site", site, "--format", "json", "--out", out)
        _one_line_error(proc, f"--out {out}", why)
    assert load_entries(site) == before  # nothing claims an export

    from datasites.governance.compliance import AuditorSession
    from datasites.runtime.site_files import officer_email

    session = AuditorSession.login(site, officer_email(site), OFFICER_PW)
    with pytest.raises(OSError):  # the write itself fails: still no entry
        session.export("csv", blocker / "audit.csv")
    assert load_entries(site) == before

    out = tmp_path / "audit.json"
    proc = _run("audit", "export", "--site", site, "--format", "json", "--out", out)
    assert proc.returncode == 0, proc.stderr
    entries = load_entries(site)
    assert len(entries) == len(before) + 1 and entries[-1]["action"] == "audit_exported"
    params = entries[-1]["params"]
    assert params["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert len(json.loads(out.read_text())["entries"]) == params["entries"] == len(before)
