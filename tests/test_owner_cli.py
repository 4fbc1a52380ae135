"""A site reopened from its directory: restart, the data owner's CLI, and `fedsyft audit`.

One small single-site datasite for the whole module (closed between tests, as a real site
would be between CLI invocations). CLI commands run in-process through typer's runner where
they need syft (already imported here); `fedsyft audit verify` runs as a real subprocess
(it does not import syft, so it is cheap).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from datasites.cli.main import app
from datasites.errors import AuthenticationError
from datasites.governance.accounts import Account, Role
from datasites.governance.audit import (
    AuditLogCorrupt,
    canonical_json,
    entry_hash,
    load_entries,
    verify,
)
from datasites.runtime.site_files import SiteBusyError
from fed_tasks.interface import SiteRefusedError
from fed_tasks.spec import JobSpec

BIN = Path(sys.executable).parent / "fedsyft"
NAME = "clinic-audit"
OWNER_PW = "owner-pass-4417"
OFFICER_PW = "officer-pass-9921"
PASSWORDS = ("FEDSYFT_OWNER_PASSWORD", "FEDSYFT_OFFICER_PASSWORD")


@pytest.fixture(scope="module")
def clinic(partitions, schema, tmp_path_factory):
    """A provisioned, then closed, site with three pending requests."""
    from datasites.adapter.scientist import ScientistSession
    from datasites.runtime.datasite import Datasite

    directory = tmp_path_factory.mktemp("kept") / NAME
    scientist = Account("ds@uni.org", Role.DATA_SCIENTIST, "scientist-pass-1")
    train, test = partitions[0]
    site = Datasite.provision(NAME, directory, train=train, test=test, schema=schema,
                              scientist=scientist, owner_password=OWNER_PW,
                              officer_password=OFFICER_PW)
    admin_pw = site.accounts[Role.ADMIN].password
    from datasites.runtime.federation_config import ensure_signing_key, write_config

    write_config(directory, {"sites": {NAME: ensure_signing_key(directory)}, "max_sites": 1,
                             "min_sites": 2, "paillier_public_key": None,
                             "key_authority": None})  # a federation of one, for its owner
    session = ScientistSession(site.login(scientist.email, scientist.password))
    specs = [JobSpec(features=schema.features, label_column=schema.label, rounds=r)
             for r in (1, 2, 1)]
    rids = [session.submit(spec) for spec in specs]
    site.requests()  # the owner has looked once: all three are in the log
    site.close()
    return SimpleNamespace(dir=directory, owner=f"owner@{NAME}.site",
                           officer=f"officer@{NAME}.site", admin=f"root@{NAME}.site",
                           admin_pw=admin_pw, scientist=scientist, specs=specs, rids=rids)


def _open(clinic, email=None, password=OWNER_PW):
    from datasites.runtime.datasite import Datasite

    return Datasite.open(clinic.dir, email or clinic.owner, password)


def _cli(*args: str, owner: str | None = OWNER_PW, officer: str | None = OFFICER_PW,
         input: str | None = None):
    env = {PASSWORDS[0]: owner, PASSWORDS[1]: officer}  # None unsets the variable
    return CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args], env=env,
                                              input=input)


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---- files and restart ----------------------------------------------------------------------
def test_site_directory_holds_no_password(clinic):
    secrets = [OWNER_PW, OFFICER_PW, clinic.admin_pw, clinic.scientist.password]
    for path in clinic.dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
    info = json.loads((clinic.dir / "site.json").read_text())
    assert info["name"] == NAME and info["accounts"]["data_owner"] == clinic.owner
    assert info["accounts"]["compliance_officer"] == clinic.officer


def test_restart_resumes_the_audit_chain_and_the_ledger(clinic):
    before = load_entries(clinic.dir)
    assert verify(clinic.dir).ok and before[-1]["action"] == "request_submitted"
    site = _open(clinic)
    try:
        assert site.guard.audit.count == len(before)  # resumed, nothing re-logged
        assert {r.request_id for r in site.requests()} == set(clinic.rids)
        assert len(load_entries(clinic.dir)) == len(before)  # requests already on record
        site.approve(clinic.rids[2], reason="restart test")
        from datasites.adapter.scientist import ScientistSession

        session = ScientistSession(site.login(clinic.scientist.email, clinic.scientist.password))
        session.connection(clinic.specs[2]).call("stats", {})  # guard re-registered
    finally:
        site.close()
    after = load_entries(clinic.dir)
    assert after[:len(before)] == before
    assert after[len(before)]["prev_hash"] == before[-1]["hash"]
    assert [e["action"] for e in after[len(before):]] == [
        "request_approved", "function_executed", "result_released"]
    report = verify(clinic.dir, (clinic.dir / "audit_key.pub").read_bytes())
    assert report.ok and report.entries == len(after)
    site = _open(clinic)  # and once more: the ledger survived too
    try:
        assert site.guard.approval(clinic.specs[2].job_id)["used"]["stats"] == 1
    finally:
        site.close()
    assert verify(clinic.dir).ok


def test_open_refuses_wrong_people_and_only_the_owner_decides(clinic):
    with pytest.raises(AuthenticationError, match="wrong email or password"):
        _open(clinic, password="not-the-password")
    with pytest.raises(AuthenticationError):  # the officer is not a syft user
        _open(clinic, clinic.officer, OFFICER_PW)
    with pytest.raises(PermissionError, match="not a data owner or admin"):
        _open(clinic, clinic.scientist.email, clinic.scientist.password)
    admin = _open(clinic, clinic.admin, clinic.admin_pw)
    try:
        with pytest.raises(SiteBusyError, match="already"):
            _open(clinic)
        assert len(admin.requests()) == 3  # the admin may read ...
        with pytest.raises(PermissionError, match="only the site's data owner"):
            admin.approve(clinic.rids[0])  # ... but not decide
        with pytest.raises(PermissionError, match="only the site's data owner"):
            admin.deny(clinic.rids[0], "no")
    finally:
        admin.close()
    entries = load_entries(clinic.dir)
    failed = [(e["actor"], e["role"]) for e in entries if e["action"] == "login_failed"]
    assert (clinic.owner, "data_owner") in failed
    assert (clinic.officer, "compliance_officer") in failed
    refused = [e["params"]["call"] for e in entries if e["action"] == "call_refused"]
    assert "open the site" in refused and f"approve request {clinic.rids[0]}" in refused
    assert verify(clinic.dir).ok


# ---- the data owner's CLI -------------------------------------------------------------------
def test_cli_requests_list_and_show(clinic):
    result = _cli("requests", "list", "--site", clinic.dir)
    assert result.exit_code == 0, result.stderr
    for rid, spec in zip(clinic.rids, clinic.specs, strict=True):
        assert rid in result.stdout and spec.job_id in result.stdout
    assert "pending" in result.stdout and "approved" in result.stdout
    result = _cli("requests", "show", clinic.rids[1][:8], "--site", clinic.dir)
    assert result.exit_code == 0, result.stderr
    assert f"job {clinic.specs[1].job_id}: train a dense autoencoder" in result.stdout
    assert "at most 2 rounds" in result.stdout
    assert f"def fedsyft_job_{clinic.specs[1].job_id}(train, test, action, payload):" \
        in result.stdout


def test_cli_approve_and_deny_are_logged_with_reasons(clinic):
    approve = _cli("requests", "approve", clinic.rids[0], "--site", clinic.dir,
                   "--reason", "study 7 consent")
    assert approve.exit_code == 0, approve.stderr
    assert f"approved at {NAME} by {clinic.owner}" in approve.stdout
    deny = _cli("requests", "deny", clinic.rids[1], "--site", clinic.dir,
                "--reason", "two rounds is too many")
    assert deny.exit_code == 0, deny.stderr
    decided = {e["objects"]["request_id"]: e for e in load_entries(clinic.dir)
               if e["action"] in ("request_approved", "request_denied")}
    assert decided[clinic.rids[0]]["actor"] == clinic.owner
    assert decided[clinic.rids[0]]["params"]["reason"] == "study 7 consent"
    assert decided[clinic.rids[1]]["action"] == "request_denied"
    assert decided[clinic.rids[1]]["params"]["reason"] == "two rounds is too many"
    listed = _cli("requests", "list", "--site", clinic.dir)
    assert "rejected" in listed.stdout and "pending" not in listed.stdout
    assert verify(clinic.dir).ok


def test_cli_bad_input_is_one_line_and_exit_2(clinic, tmp_path):
    line = _one_line_error(_cli("requests", "deny", "ffff0000", "--site", clinic.dir,
                                "--reason", "x"))
    assert "no request 'ffff0000' at site 'clinic-audit'" in line
    line = _one_line_error(_cli("requests", "list", "--site", clinic.dir, owner="wrong-pass"))
    assert "cannot log in to site 'clinic-audit' as 'owner@clinic-audit.site'" in line
    assert load_entries(clinic.dir)[-1]["action"] == "login_failed"
    line = _one_line_error(_cli("requests", "list", "--site", tmp_path / "nowhere"))
    assert "does not exist" in line
    line = _one_line_error(_cli("requests", "list", "--site", tmp_path))
    assert "not a fedsyft site directory" in line
    _cli("requests", "approve", clinic.rids[0], "--site", clinic.dir)  # approved (again?)
    line = _one_line_error(_cli("requests", "approve", clinic.rids[0], "--site", clinic.dir))
    assert "already approved" in line
    copy = tmp_path / "copy"
    shutil.copytree(clinic.dir, copy, ignore=shutil.ignore_patterns("site.lock"))
    lines = (copy / "audit.jsonl").read_bytes().splitlines(keepends=True)
    (copy / "audit.jsonl").write_bytes(b"".join(lines[:3] + [b"{garbage\n"] + lines[4:]))
    line = _one_line_error(_cli("requests", "list", "--site", copy))
    assert "audit log is corrupt, refusing to open the site: line 4 is not valid JSON" in line
    from datasites.runtime.datasite import Datasite

    with pytest.raises(AuditLogCorrupt):
        Datasite.open(copy, clinic.owner, OWNER_PW)
    line = _one_line_error(_cli("requests", "list", "--site", clinic.dir, owner=None, input=""))
    assert "no password" in line and "FEDSYFT_OWNER_PASSWORD" in line
    result = _cli("requests", "deny", clinic.rids[2], "--site", clinic.dir)  # no --reason
    assert result.exit_code == 2 and "--reason" in result.stderr


def test_cli_password_prompt_hides_input(clinic):
    result = _cli("requests", "list", "--site", clinic.dir, owner=None, input=OWNER_PW + "\n")
    assert result.exit_code == 0, result.stderr
    assert clinic.rids[0] in result.stdout and OWNER_PW not in result.stdout


def test_nothing_happens_when_the_log_cannot_record_it(clinic):
    """Write-ahead: with the log broken behind the site's back, no decision and no call."""
    from datasites.adapter.scientist import ScientistSession

    spec = clinic.specs[2]  # approved, stats used, one fit left
    site = _open(clinic)
    log_file = clinic.dir / "audit.jsonl"
    saved = log_file.read_bytes()
    try:
        session = ScientistSession(site.login(clinic.scientist.email, clinic.scientist.password))
        log_file.write_bytes(saved.splitlines(keepends=True)[0])  # entries deleted
        with pytest.raises(AuditLogCorrupt, match="shrank"):
            site.deny(clinic.rids[2], "revoke")
        assert not site.guard.approval(spec.job_id).get("revoked")
        with pytest.raises(SiteRefusedError, match="cannot record this call in its audit log"):
            session.connection(spec).call("evaluate", {})
        assert site.guard.approval(spec.job_id)["used"]["evaluate"] == 0  # not spent, not run
    finally:
        log_file.write_bytes(saved)
        site.close()
    assert verify(clinic.dir).ok
    assert load_entries(clinic.dir)[-1]["action"] != "request_overridden"


# ---- `fedsyft audit` --------------------------------------------------------------------------
def _audit_copy(clinic, dest: Path) -> Path:
    dest.mkdir()
    for name in ("audit.jsonl", "audit.head.json", "audit_key.pub"):
        shutil.copy2(clinic.dir / name, dest / name)
    return dest


def _entries(d: Path) -> list[bytes]:
    return (d / "audit.jsonl").read_bytes().splitlines(keepends=True)


def _modify(d: Path) -> None:
    lines = _entries(d)
    e = json.loads(lines[3])
    e["params"]["email"] = "mallory@evil.org"
    lines[3] = (canonical_json(e) + "\n").encode()
    (d / "audit.jsonl").write_bytes(b"".join(lines))


def _delete(d: Path) -> None:
    lines = _entries(d)
    del lines[3]
    (d / "audit.jsonl").write_bytes(b"".join(lines))


def _insert(d: Path) -> None:
    lines = _entries(d)
    forged = json.loads(lines[3])
    forged["actor"] = "mallory@evil.org"
    forged["hash"] = entry_hash(forged)
    lines.insert(3, (canonical_json(forged) + "\n").encode())
    (d / "audit.jsonl").write_bytes(b"".join(lines))


def _reorder(d: Path) -> None:
    lines = _entries(d)
    lines[3], lines[4] = lines[4], lines[3]
    (d / "audit.jsonl").write_bytes(b"".join(lines))


TAMPERS = {
    "modify": (_modify, "entry 3 was modified: its hash does not match its content"),
    "delete": (_delete, "entry 4 does not follow entry 2: entry 3 is missing"),
    "insert": (_insert, "the chain forks at entry 3 (an entry was inserted)"),
    "reorder": (_reorder, "entry 4 does not follow entry 2: entry 3 is missing"),
}


def test_cli_audit_verify_passes_on_the_untouched_log_after_restarts(clinic):
    proc = subprocess.run([str(BIN), "audit", "verify", "--site", str(clinic.dir),
                           "--public-key", str(clinic.dir / "audit_key.pub")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hash chain intact, head signature valid" in proc.stdout


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_cli_audit_verify_names_where_the_chain_breaks(clinic, tmp_path, kind):
    tamper, message = TAMPERS[kind]
    copy = _audit_copy(clinic, tmp_path / "audit")
    tamper(copy)
    proc = subprocess.run([str(BIN), "audit", "verify", "--site", str(copy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert "\n" not in line and "BROKEN at entry 3" in line and message in line


def test_cli_audit_export_and_officer_view(clinic, tmp_path):
    for fmt in ("json", "csv", "html"):
        result = _cli("audit", "export", "--site", clinic.dir, "--format", fmt,
                      "--out", tmp_path / f"audit.{fmt}")
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / f"audit.{fmt}").stat().st_size > 0
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["verify"]["ok"]
    logged = load_entries(clinic.dir)[-3:]  # each export logged after its file was written
    assert [(e["action"], e["params"]["format"]) for e in logged] == [
        ("audit_exported", "json"), ("audit_exported", "csv"), ("audit_exported", "html")]
    assert logged[0]["params"]["entries"] == len(doc["entries"])
    assert "Chain verified" in (tmp_path / "audit.html").read_text()
    view = _cli("audit", "requests", "--site", clinic.dir)
    assert view.exit_code == 0, view.stderr
    assert f"approved by {clinic.owner} (data_owner)" in view.stdout
    assert "study 7 consent" in view.stdout and "two rounds is too many" in view.stdout
    line = _one_line_error(_cli("audit", "export", "--site", clinic.dir, "--format", "json",
                                "--out", tmp_path / "x.json", officer="wrong-pass"))
    assert "as compliance officer 'officer@clinic-audit.site': wrong email or password" in line
    assert load_entries(clinic.dir)[-1]["action"] == "login_failed"
    line = _one_line_error(_cli("audit", "export", "--site", clinic.dir, "--format", "pdf",
                                "--out", tmp_path / "x.pdf"))
    assert "unknown format 'pdf'" in line
    line = _one_line_error(_cli("audit", "verify", "--site", tmp_path / "nowhere"))
    assert "does not exist" in line
    broken = _audit_copy(clinic, tmp_path / "broken")
    _delete(broken)
    shutil.copy2(clinic.dir / "site.json", broken / "site.json")
    shutil.copy2(clinic.dir / "provisioned.json", broken / "provisioned.json")
    shutil.copy2(clinic.dir / "officer.json", broken / "officer.json")
    result = _cli("audit", "export", "--site", broken, "--format", "html",
                  "--out", tmp_path / "broken.html")
    assert result.exit_code == 1 and "BROKEN" in result.stderr
    assert "VERIFICATION FAILED (first bad entry: 3)" in (tmp_path / "broken.html").read_text()


# ---- the officer needs only the site's public key ----------------------------------------------
_KEY_OPENS: list[str] = []
_WATCHING: list[bool] = []


def _watch_key_opens(event: str, args: tuple) -> None:
    """Python's own audit hook (PEP 578): every open() and os.open() passes through here."""
    if _WATCHING and event == "open" and args and str(args[0]).endswith("audit_key.pem"):
        _KEY_OPENS.append(str(args[0]))


sys.addaudithook(_watch_key_opens)  # cannot be removed; inert unless _WATCHING


def test_officer_reads_never_open_the_signing_key(clinic):
    _KEY_OPENS.clear()
    _WATCHING.append(True)
    try:
        from datasites.governance.compliance import AuditorSession

        session = AuditorSession.login(clinic.dir, clinic.officer, OFFICER_PW)
        assert session.verify().ok and session.entries() and session.requests()
        for args in (("verify", "--site", clinic.dir), ("requests", "--site", clinic.dir)):
            result = _cli("audit", *args)
            assert result.exit_code == 0, result.stderr
    finally:
        _WATCHING.clear()
    assert _KEY_OPENS == []


def test_officer_tools_work_without_the_signing_key(clinic, tmp_path):
    """Verify, list and export with the public key alone; what would need the signing key
    (logging the export, the failed login) is skipped and said so, never faked or created.
    (The key is moved away: a mode-000 key would prove nothing where tests run as root.)"""
    how = "removed"
    key, aside = clinic.dir / "audit_key.pem", tmp_path / "audit_key.pem"
    before = load_entries(clinic.dir)
    if how == "removed":
        shutil.move(key, aside)
    else:
        key.chmod(0)
    try:
        ok = _cli("audit", "verify", "--site", clinic.dir,
                  "--public-key", clinic.dir / "audit_key.pub")
        assert ok.exit_code == 0 and "head signature valid" in ok.stdout, ok.stderr
        view = _cli("audit", "requests", "--site", clinic.dir)
        assert view.exit_code == 0 and clinic.rids[0] in view.stdout, view.stderr
        out = tmp_path / "audit.json"
        exported = _cli("audit", "export", "--site", clinic.dir, "--format", "json",
                        "--out", out)
        assert exported.exit_code == 0, exported.stderr
        warning = exported.stderr.strip().splitlines()
        assert len(warning) == 1 and "the export could not be logged" in warning[0]
        assert "not running here and its signing key is not readable here" in warning[0]
        doc = json.loads(out.read_text())
        assert doc["verify"]["ok"] and len(doc["entries"]) == len(before)
        line = _one_line_error(_cli("audit", "requests", "--site", clinic.dir,
                                    officer="wrong-pass"))
        assert "wrong email or password (this failed login was not recorded" in line
        assert load_entries(clinic.dir) == before  # nothing written without the site key
        assert (how == "removed") != key.exists()  # and no key was created
    finally:
        if how == "removed":
            shutil.move(aside, key)
        else:
            key.chmod(0o600)
    assert verify(clinic.dir).ok
