"""Tamper-evident audit log: real files, real Ed25519, real threads and processes."""

from __future__ import annotations

import ast
import base64
import csv
import json
import multiprocessing
import os
import re
import stat
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from datasites.governance import audit_report
from datasites.governance.audit import (
    ACTIONS,
    GENESIS_HASH,
    Action,
    AuditEntryError,
    AuditError,
    AuditKeyError,
    AuditLog,
    AuditLogCorrupt,
    Role,
    canonical_json,
    entry_hash,
    load_entries,
    verify,
)

SITE = "hospital-a"
OWNER = "owner@hospital-a.org"
SCIENTIST = "alice@uni.edu"
OFFICER = "dpo@hospital-a.org"
N = 10


def _fill(log: AuditLog, n: int, start: int = 0) -> list[dict]:
    return [
        log.append(SCIENTIST, Role.DATA_SCIENTIST, Action.REQUEST_SUBMITTED,
                   objects={"request_id": f"r{start + k}"}, code_hash="ab" * 32,
                   params={"purpose": "anomaly scores", "k": start + k})
        for k in range(n)
    ]  # fmt: skip


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    d = tmp_path / SITE
    with AuditLog(d, SITE) as log:
        _fill(log, N)
    return d


def _lines(d: Path) -> list[bytes]:
    return (d / "audit.jsonl").read_bytes().splitlines(keepends=True)


def _write(d: Path, lines: list[bytes]) -> None:
    (d / "audit.jsonl").write_bytes(b"".join(lines))


def _line(entry: dict) -> bytes:
    return (canonical_json(entry) + "\n").encode()


def _rehash(entry: dict) -> dict:
    entry = dict(entry)
    entry["hash"] = entry_hash(entry)
    return entry


# ----------------------------------------------------------------------------- basics


def test_append_returns_entry_as_written(tmp_path: Path) -> None:
    d = tmp_path / SITE
    with AuditLog(d, SITE) as log:
        first = log.append(OWNER, "data_owner", "dataset_published",
                           objects={"dataset_id": "ds1"}, params={"rows": 120, "name": "tx"})
        second = log.append(SCIENTIST, Role.DATA_SCIENTIST, Action.REQUEST_SUBMITTED,
                            objects={"request_id": "r1"}, code_hash="cd" * 32)
        assert log.count == 2
        assert log.entries() == [first, second]
    assert first["seq"] == 0 and second["seq"] == 1
    assert first["prev_hash"] == GENESIS_HASH and second["prev_hash"] == first["hash"]
    assert first["hash"] == entry_hash(first)
    assert (first["site"], first["actor"], first["role"]) == (SITE, OWNER, "data_owner")
    assert first["code_hash"] is None and second["params"] == {}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", first["time"])
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    # canonical, one entry per line
    assert _lines(d) == [_line(first), _line(second)]
    # key files: private 0600, public loadable on its own, head signed and pointing at seq 1
    assert stat.S_IMODE((d / "audit_key.pem").stat().st_mode) == 0o600
    serialization.load_pem_public_key((d / "audit_key.pub").read_bytes())
    head = json.loads((d / "audit.head.json").read_text())
    assert (head["seq"], head["count"], head["hash"], head["site"]) == (1, 2, second["hash"], SITE)
    assert verify(d).ok


def test_entries_filters(site_dir: Path) -> None:
    with AuditLog(site_dir, SITE) as log:
        log.append(OFFICER, Role.COMPLIANCE_OFFICER, Action.REQUEST_APPROVED,
                   objects={"request_id": "r3"}, params={"reason": "ok"})
        all_entries = log.entries()
        assert len(all_entries) == N + 1
        assert [e["seq"] for e in log.entries(action="request_approved")] == [N]
        assert len(log.entries(action=["request_approved", "request_submitted"])) == N + 1
        assert [e["seq"] for e in log.entries(actor=OFFICER)] == [N]
        middle = all_entries[4]["time"]
        assert all(e["time"] >= middle for e in log.entries(since=middle))
        assert [e["seq"] for e in log.entries(until=middle)] == [0, 1, 2, 3]
        future = datetime.now(UTC) + timedelta(days=1)
        assert log.entries(since=future) == []
        with pytest.raises(AuditError, match="timezone"):
            log.entries(since=datetime(2024, 1, 1))
    assert load_entries(site_dir, actor=SCIENTIST) == all_entries[:N]


def test_invalid_entries_are_rejected_without_writing(site_dir: Path) -> None:
    before = (site_dir / "audit.jsonl").read_bytes()
    with AuditLog(site_dir, SITE) as log:
        with pytest.raises(AuditEntryError, match="unknown action 'request_aproved'"):
            log.append(OFFICER, Role.COMPLIANCE_OFFICER, "request_aproved")
        with pytest.raises(AuditEntryError, match="unknown role"):
            log.append(OFFICER, "admin", Action.REQUEST_APPROVED)
        with pytest.raises(AuditEntryError, match="email"):
            log.append("alice", Role.DATA_SCIENTIST, Action.REQUEST_SUBMITTED)
        with pytest.raises(AuditEntryError, match="params for budget_charged is not JSON-safe"):
            log.append(OWNER, Role.DATA_OWNER, Action.BUDGET_CHARGED,
                       params={"epsilon": float("nan")})
        with pytest.raises(AuditEntryError, match="not JSON-safe"):
            log.append(OWNER, Role.DATA_OWNER, Action.POLICY_CHANGED, params={"x": b"raw"})
        # system actors need not be email addresses
        log.append("scheduler", Role.SYSTEM, Action.SITE_PROVISIONED)
    assert (site_dir / "audit.jsonl").read_bytes().startswith(before)
    assert verify(site_dir).ok and verify(site_dir).entries == N + 1


def test_action_enum_covers_documented_names() -> None:
    for name in ("dataset_published", "request_submitted", "request_approved", "request_denied",
                 "request_overridden", "function_executed", "result_released", "budget_charged",
                 "policy_changed", "login_failed", "call_refused", "site_provisioned"):
        assert name in ACTIONS


def test_restart_resumes_chain(site_dir: Path) -> None:
    pub = (site_dir / "audit_key.pub").read_bytes()
    report = verify(site_dir, pub)
    assert (report.ok, report.entries, report.first_bad_seq, report.problem) == (True, N, None, "")
    with AuditLog(site_dir, SITE) as log:  # "restart"
        assert log.count == N
        more = _fill(log, 3, start=N)
    entries = load_entries(site_dir)
    assert [e["seq"] for e in entries] == list(range(N + 3))
    assert more[0]["prev_hash"] == entries[N - 1]["hash"]
    assert (site_dir / "audit_key.pub").read_bytes() == pub  # same key after restart
    assert verify(site_dir, pub) == verify(site_dir)
    assert verify(site_dir, pub).ok and verify(site_dir, pub).entries == N + 3


def test_opening_as_another_site_is_refused(site_dir: Path) -> None:
    with pytest.raises(AuditError, match="holds the audit log of site 'hospital-a', not 'b'"):
        AuditLog(site_dir, "b")


def test_exposed_private_key_is_refused(site_dir: Path) -> None:
    os.chmod(site_dir / "audit_key.pem", 0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        AuditLog(site_dir, SITE)


def test_missing_private_key_with_existing_log_is_refused(site_dir: Path) -> None:
    (site_dir / "audit_key.pem").unlink()
    with pytest.raises(AuditKeyError, match="cannot resume"):
        AuditLog(site_dir, SITE)


# ----------------------------------------------------------------------------- tampering


def _modify_field(d: Path) -> None:
    lines = _lines(d)
    e = json.loads(lines[5])
    e["params"]["purpose"] = "exfiltrate"
    lines[5] = _line(e)
    _write(d, lines)


def _modify_and_rehash(d: Path) -> None:
    lines = _lines(d)
    e = json.loads(lines[5])
    e["actor"] = "mallory@evil.org"
    lines[5] = _line(_rehash(e))
    _write(d, lines)


def _delete_middle(d: Path) -> None:
    lines = _lines(d)
    del lines[5]
    _write(d, lines)


def _insert_forged(d: Path) -> None:
    lines = _lines(d)
    prev = json.loads(lines[4])
    forged = json.loads(lines[5])
    forged.update(actor="mallory@evil.org", prev_hash=prev["hash"])
    lines.insert(5, _line(_rehash(forged)))
    _write(d, lines)


def _swap(d: Path) -> None:
    lines = _lines(d)
    lines[3], lines[4] = lines[4], lines[3]
    _write(d, lines)


def _delete_tail(d: Path) -> None:
    _write(d, _lines(d)[:7])


def _garbage_line(d: Path) -> None:
    lines = _lines(d)
    lines[4] = b"\x00\xffnot json at all{\n"
    _write(d, lines)


def _rewrite_chain(d: Path) -> None:
    """Edit entry 5 and recompute every later prev_hash/hash; only the head can tell."""
    entries = [json.loads(x) for x in _lines(d)]
    entries[5]["actor"] = "mallory@evil.org"
    for k in range(5, len(entries)):
        entries[k]["prev_hash"] = entries[k - 1]["hash"]
        entries[k] = _rehash(entries[k])
    _write(d, [_line(e) for e in entries])


def _append_forged(d: Path) -> None:
    last = json.loads(_lines(d)[-1])
    forged = dict(last, seq=N, prev_hash=last["hash"], actor="mallory@evil.org")
    _write(d, _lines(d) + [_line(_rehash(forged))])


TAMPERS = [
    (_modify_field, 5, "entry 5 was modified: its hash does not match its content"),
    (_modify_and_rehash, 6, "entry 6 does not follow entry 5: prev_hash mismatch"),
    (_delete_middle, 5, "entry 6 does not follow entry 4: entry 5 is missing"),
    (_insert_forged, 5, "the chain forks at entry 5 (an entry was inserted)"),
    (_swap, 3, "entry 4 does not follow entry 2: entry 3 is missing"),
    (_delete_tail, 7, "log ends at entry 6 but the signed head says 10 entries (tail deleted)"),
    (_garbage_line, 4, "line 5 is not valid JSON"),
    (_rewrite_chain, None, "entry 9 does not match the signed head's hash (log rewritten"),
    (_append_forged, N, "entry 10 is not covered by the signature"),
]


@pytest.mark.parametrize(("tamper", "first_bad", "message"), TAMPERS,
                         ids=[t[0].__name__.strip("_") for t in TAMPERS])
def test_tampering_is_detected_and_blocks_appends(site_dir, tamper, first_bad, message) -> None:
    pub = (site_dir / "audit_key.pub").read_bytes()
    tamper(site_dir)
    report = verify(site_dir, pub)
    assert not report.ok
    assert report.first_bad_seq == first_bad, report.problem
    assert message in report.problem
    assert verify(site_dir) == report
    broken = (site_dir / "audit.jsonl").read_bytes()
    with pytest.raises(AuditLogCorrupt, match="refusing to append") as err:
        AuditLog(site_dir, SITE)
    assert message in str(err.value) and err.value.report == report
    assert (site_dir / "audit.jsonl").read_bytes() == broken  # nothing was added


def test_head_forged_with_another_key(site_dir: Path) -> None:
    """Attacker deletes the tail and writes a head (and key files) of their own."""
    pinned = (site_dir / "audit_key.pub").read_bytes()
    _delete_tail(site_dir)
    last = json.loads(_lines(site_dir)[-1])
    head = json.loads((site_dir / "audit.head.json").read_text())
    head.update(seq=last["seq"], count=last["seq"] + 1, hash=last["hash"])
    evil = Ed25519PrivateKey.generate()
    payload = canonical_json({k: v for k, v in head.items() if k != "signature"}).encode()
    head["signature"] = base64.b64encode(evil.sign(payload)).decode()
    (site_dir / "audit.head.json").write_text(json.dumps(head))

    report = verify(site_dir, pinned)
    assert not report.ok and report.first_bad_seq is None
    assert "signature is not valid" in report.problem
    assert "forged or re-signed with another key" in report.problem
    with pytest.raises(AuditLogCorrupt, match="signature is not valid"):
        AuditLog(site_dir, SITE)

    # Replacing audit_key.pub as well fools the default check, but not a pinned key.
    evil_pub = evil.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (site_dir / "audit_key.pub").write_bytes(evil_pub)
    assert verify(site_dir).ok
    assert not verify(site_dir, pinned).ok


def test_missing_head_is_detected(site_dir: Path) -> None:
    (site_dir / "audit.head.json").unlink()
    report = verify(site_dir)
    assert not report.ok and report.first_bad_seq is None
    assert "audit.head.json is missing" in report.problem
    with pytest.raises(AuditLogCorrupt):
        AuditLog(site_dir, SITE)


def test_tampering_while_open_refuses_appends(site_dir: Path) -> None:
    with AuditLog(site_dir, SITE) as log:
        _write(site_dir, _lines(site_dir)[:-2])  # truncate behind the writer's back
        with pytest.raises(AuditLogCorrupt, match="shrank"):
            log.append(OFFICER, Role.COMPLIANCE_OFFICER, Action.REQUEST_DENIED)
        with pytest.raises(AuditLogCorrupt, match="shrank"):  # stays refused
            log.append(OFFICER, Role.COMPLIANCE_OFFICER, Action.REQUEST_DENIED)
    with AuditLog(site_dir / ".." / "other", "other") as log:
        _fill(log, 2)
        with open(site_dir / ".." / "other" / "audit.jsonl", "ab") as f:
            f.write(b'{"forged": true}\n')
        with pytest.raises(AuditLogCorrupt, match="not an audit entry"):
            log.append(OFFICER, Role.COMPLIANCE_OFFICER, Action.REQUEST_DENIED)


def test_crash_between_entry_and_head_needs_explicit_recovery(site_dir: Path) -> None:
    """A crash after fsyncing an entry but before re-signing the head, then a torn write."""
    head_before = (site_dir / "audit.head.json").read_bytes()
    with AuditLog(site_dir, SITE) as log:
        log.append(OFFICER, Role.COMPLIANCE_OFFICER, Action.REQUEST_APPROVED,
                   objects={"request_id": "r1"}, params={"reason": "fine"})
    (site_dir / "audit.head.json").write_bytes(head_before)  # head write "lost"
    with open(site_dir / "audit.jsonl", "ab") as f:
        f.write(b'{"seq": 11, "time": "2025-')  # torn write of the next entry

    report = verify(site_dir)
    assert not report.ok and report.first_bad_seq == N + 1 and "torn write" in report.problem
    with pytest.raises(AuditLogCorrupt, match="fedsyft site repair"):
        AuditLog(site_dir, SITE)

    with AuditLog(site_dir, SITE, recover_unsigned_tail=True) as log:
        recovered = log.entries(action="audit_recovered")
        assert len(recovered) == 1
        assert recovered[0]["params"]["signed_entries"] == N
        assert recovered[0]["params"]["unsigned_entries"] == 1
        assert recovered[0]["params"]["torn_bytes"] == len(b'{"seq": 11, "time": "2025-')
        log.append(OFFICER, Role.COMPLIANCE_OFFICER, Action.REQUEST_DENIED,
                   objects={"request_id": "r2"})
    assert verify(site_dir).ok and verify(site_dir).entries == N + 3


def test_recovery_does_not_accept_real_tampering(site_dir: Path) -> None:
    _delete_middle(site_dir)
    with pytest.raises(AuditLogCorrupt, match="entry 5 is missing"):
        AuditLog(site_dir, SITE, recover_unsigned_tail=True)


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_appends_from_threads_and_two_writers(tmp_path: Path) -> None:
    d = tmp_path / SITE
    first, second = AuditLog(d, SITE), AuditLog(d, SITE)  # two writers on one directory
    errors: list[BaseException] = []

    def worker(log: AuditLog, t: int) -> None:
        try:
            for k in range(15):
                log.append(SCIENTIST, Role.DATA_SCIENTIST, Action.FUNCTION_EXECUTED,
                           objects={"job_id": f"t{t}-{k}"})
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(first if t % 2 else second, t))
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close()
    second.close()
    assert errors == []
    report = verify(d)
    assert report.ok and report.entries == 60, report.problem
    entries = load_entries(d)
    assert [e["seq"] for e in entries] == list(range(60))
    assert len({e["objects"]["job_id"] for e in entries}) == 60
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)


def _process_worker(directory: str, tag: str) -> None:
    with AuditLog(directory, SITE) as log:
        for k in range(10):
            log.append("scheduler", Role.SYSTEM, Action.FUNCTION_EXECUTED,
                       objects={"job_id": f"{tag}-{k}"})


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_concurrent_appends_from_processes(site_dir: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process_worker, args=(str(site_dir), f"p{i}")) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    report = verify(site_dir)
    assert report.ok and report.entries == N + 30, report.problem


# ----------------------------------------------------------------------------- export


@pytest.fixture
def story_dir(tmp_path: Path) -> Path:
    """A small realistic history: publish, requests decided three ways, releases, budget."""
    d = tmp_path / "story"
    with AuditLog(d, SITE) as log:
        log.append("provisioner", Role.SYSTEM, Action.SITE_PROVISIONED,
                   params={"syft_version": "0.9.5"})
        log.append(OWNER, Role.DATA_OWNER, Action.DATASET_PUBLISHED,
                   objects={"dataset_id": "ds1"}, params={"name": "transactions", "rows": 500})
        for rid in ("r1", "r2", "r3"):
            log.append(SCIENTIST, Role.DATA_SCIENTIST, Action.REQUEST_SUBMITTED,
                       objects={"request_id": rid, "dataset_id": "ds1"}, code_hash="ef" * 32)
        log.append(OWNER, Role.DATA_OWNER, Action.REQUEST_APPROVED,
                   objects={"request_id": "r1"}, params={"reason": "aggregate scores only"})
        log.append(OWNER, Role.DATA_OWNER, Action.REQUEST_DENIED,
                   objects={"request_id": "r2"}, params={"reason": "returns raw rows"})
        log.append(OFFICER, Role.COMPLIANCE_OFFICER, Action.REQUEST_OVERRIDDEN,
                   objects={"request_id": "r2"},
                   params={"decision": "approved", "reason": "rows are synthetic"})
        for rid, eps in (("r1", 0.5), ("r2", 0.25)):
            log.append("runner", Role.SYSTEM, Action.BUDGET_CHARGED,
                       objects={"request_id": rid}, params={"dataset": "ds1", "epsilon": eps})
            log.append(OWNER, Role.DATA_OWNER, Action.RESULT_RELEASED,
                       objects={"request_id": rid, "result_id": f"res-{rid}"},
                       params={"sha256": rid * 32, "bytes": 1024, "recipient": SCIENTIST})
        log.append("runner", Role.SYSTEM, Action.BUDGET_CHARGED,
                   params={"dataset": "ds2", "epsilon": 1})
        log.append("<script>alert(1)</script>@x.org", Role.DATA_SCIENTIST, Action.CALL_REFUSED,
                   params={"call": "api.services.dataset.get_all", "reason": "not allowed"})
        log.append("=cmd|calc@x.org", Role.DATA_SCIENTIST, Action.LOGIN_FAILED,
                   params={"reason": "bad password"})
    return d


def test_export_json(story_dir: Path, tmp_path: Path) -> None:
    out = audit_report.export(story_dir, "json", tmp_path / "out" / "audit.json")
    doc = json.loads(out.read_text())
    assert doc["site"] == SITE
    assert doc["verify"] == {"ok": True, "entries": 15, "first_bad_seq": None, "problem": ""}
    assert doc["entries"] == load_entries(story_dir)


def test_export_csv(story_dir: Path, tmp_path: Path) -> None:
    out = audit_report.export(story_dir, "csv", tmp_path / "audit.csv")
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["seq", "time", "site"] and "hash" in rows[0]
    assert len(rows) == 1 + 15
    assert [r[0] for r in rows[1:]] == [str(k) for k in range(15)]
    assert json.loads(rows[2][rows[0].index("objects")]) == {"dataset_id": "ds1"}
    actor = rows[0].index("actor")
    assert rows[-1][actor] == "'=cmd|calc@x.org"  # spreadsheet formula defused


def test_export_html(story_dir: Path, tmp_path: Path) -> None:
    out = audit_report.export(story_dir, "html", tmp_path / "audit.html")
    page = out.read_text()
    assert "Chain verified: 15 entries" in page
    assert "<table>" in page
    for text in ("aggregate scores only", "rows are synthetic", "overridden &rarr; approved",
                 "pending", "r1" * 32, "api.services.dataset.get_all", "bad password"):
        assert text in page, text
    assert "<script>" not in page and "&lt;script&gt;" in page
    m = re.search(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert m, "no embedded plot"
    assert base64.b64decode(m.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert "http://" not in page and "https://" not in page  # self-contained


def test_export_of_tampered_log_says_so(story_dir: Path, tmp_path: Path) -> None:
    _modify_field_at(story_dir, 5)
    page = audit_report.export(story_dir, "html", tmp_path / "a.html").read_text()
    assert "VERIFICATION FAILED (first bad entry: 5)" in page
    doc = json.loads(audit_report.export(story_dir, "json", tmp_path / "a.json").read_text())
    assert doc["verify"]["ok"] is False and doc["verify"]["first_bad_seq"] == 5


def _modify_field_at(d: Path, k: int) -> None:
    lines = _lines(d)
    e = json.loads(lines[k])
    e["params"]["reason"] = "changed later"
    lines[k] = _line(e)
    _write(d, lines)


def test_export_without_budget_has_no_plot_and_rejects_unknown_format(site_dir, tmp_path) -> None:
    page = audit_report.export(site_dir, "html", tmp_path / "a.html").read_text()
    assert "No budget charges recorded." in page and "<img" not in page
    with pytest.raises(ValueError, match="unknown audit export format 'pdf'"):
        audit_report.export(site_dir, "pdf", tmp_path / "a.pdf")


def test_audit_modules_do_not_import_syft() -> None:
    allowed = set(sys.stdlib_module_names) | {"cryptography", "matplotlib", "datasites"}
    root = Path(__file__).resolve().parents[1] / "datasites" / "governance"
    for name in ("audit.py", "audit_report.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in allowed, f"{name} imports {mod}"
            if name == "audit.py":
                assert not any(m.startswith(("datasites", "matplotlib")) for m in mods)
