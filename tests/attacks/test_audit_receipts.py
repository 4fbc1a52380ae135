"""Attack: the site's own staff rewrite the audit log and re-sign it with the site's key.

Whoever holds ``audit_key.pem`` can rebuild the hash chain after deleting or editing an entry
and sign a new head: plain ``fedsyft audit verify`` passes, and so does the site when it
reopens the log. The data scientist kept the signed head that came with every reply
(receipts); ``fedsyft audit verify --receipts`` finds the rewrite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from datasites.adapter import job_code
from datasites.adapter.scientist import ScientistSession
from datasites.cli.main import app
from datasites.governance.audit import (
    AuditLog,
    canonical_json,
    entry_hash,
    head_signature_valid,
    key_id,
    load_public_key,
    verify,
)
from datasites.governance.receipts import PEER_RECEIPTS
from fed_tasks.codec import dumps, loads
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec

AUDIT_FILES = ("audit.jsonl", "audit.head.json", "audit_key.pub", "audit_key.pem")


def _cli(*args: object):
    return CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args])


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def rewrite_history(directory: Path, change: Callable[[list[dict[str, Any]]], None]) -> None:
    """What a malicious operator with the site's signing key does: change the entries,
    renumber them, rebuild the hash chain and sign a fresh head, exactly as the site would."""
    entries = [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]
    change(entries)
    prev = "0" * 64
    for seq, entry in enumerate(entries):
        entry["seq"], entry["prev_hash"] = seq, prev
        entry["hash"] = prev = entry_hash(entry)
    (directory / "audit.jsonl").write_text("".join(canonical_json(e) + "\n" for e in entries))
    key = serialization.load_pem_private_key((directory / "audit_key.pem").read_bytes(), None)
    head = json.loads((directory / "audit.head.json").read_text())
    head.update(seq=len(entries) - 1, hash=prev, count=len(entries),
                key_id=key_id(key.public_key()))
    payload = canonical_json({k: v for k, v in head.items() if k != "signature"})
    head["signature"] = base64.b64encode(key.sign(payload.encode("ascii"))).decode()
    (directory / "audit.head.json").write_text(json.dumps(head, indent=2, sort_keys=True))


def _releases(entries: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["action"] == "result_released"
            and e["objects"].get("job_id") == job_id]


def _delete_first_release(job_id: str) -> Callable[[list[dict[str, Any]]], None]:
    def change(entries: list[dict[str, Any]]) -> None:
        entries.remove(_releases(entries, job_id)[0])
    return change


def _edit_first_release(job_id: str) -> Callable[[list[dict[str, Any]]], None]:
    def change(entries: list[dict[str, Any]]) -> None:
        _releases(entries, job_id)[0]["params"]["recipient"] = "someone-else@uni.org"
    return change


@pytest.fixture(scope="module")
def job_with_receipts(federation, schema, tmp_path_factory):
    """A real two-round job through the real datasites, the scientist keeping receipts."""
    receipts = tmp_path_factory.mktemp("scientist") / "receipts.jsonl"
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=2)
    federation.approve_all(federation.submit(spec))
    sessions = [ScientistSession(s.client, receipts=receipts) for s in federation.sessions()]
    FederatedTrainer(spec, [s.connection(spec) for s in sessions], progress=False).fit()
    site = federation.sites[0]
    snapshot = tmp_path_factory.mktemp("snapshot")  # the site's log as it is after the job
    for name in AUDIT_FILES:
        shutil.copy2(site.directory / name, snapshot / name)
    peer = tmp_path_factory.mktemp("peer")  # what another member kept of this site's heads
    shutil.copy2(federation.sites[1].directory / PEER_RECEIPTS, peer / PEER_RECEIPTS)
    return spec, site, receipts, snapshot


def _site_copy(snapshot: Path, dest: Path) -> Path:
    shutil.copytree(snapshot, dest)
    return dest


def test_every_reply_carries_a_signed_receipt(job_with_receipts):
    spec, site, receipts, snapshot = job_with_receipts
    lines = [json.loads(line) for line in receipts.read_text().splitlines()]
    mine = [r for r in lines if r["site"] == site.name]
    # one per released reply: statistics and two rounds (the shape of "result" is untouched)
    assert [r["action"] for r in mine][:1] == ["stats"] and len(mine) >= 3
    assert all(r["job_id"] == spec.job_id for r in mine)
    key = load_public_key(snapshot / "audit_key.pub")
    assert all(head_signature_valid(r["audit_head"], key) for r in mine)
    seqs = [r["audit_head"]["seq"] for r in mine]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    released = _releases([json.loads(x) for x in (snapshot / "audit.jsonl").read_text()
                          .splitlines()], spec.job_id)
    # each receipt precedes its own result_released entry (head read after function_executed)
    assert len(released) == len(mine)
    assert all(r["audit_head"]["seq"] < e["seq"] for r, e in zip(mine, released, strict=True))
    ok = _cli("audit", "verify", "--site", snapshot, "--receipts", receipts)
    assert ok.exit_code == 0, ok.stderr
    assert f"matches all {len(mine)} receipt(s) of site {site.name}" in ok.stdout


def test_release_is_logged_with_the_hash_of_the_reply_including_its_receipt(federation,
                                                                            schema):
    """The exact string that leaves carries the head, and result_released hashes that string."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=1)
    session = federation.sessions()[2]
    site = federation.site(session.site)
    site.approve(session.submit(spec))
    assets = session.assets()
    func = getattr(session.client.code, job_code.function_name(spec.job_id))
    raw = func(train=assets["train"], test=assets["test"], action="stats",
               payload=dumps({})).get()
    envelope = loads(raw)
    assert envelope["status"] == "ok" and "result" in envelope
    head = envelope["audit_head"]
    assert head["site"] == site.name
    assert head_signature_valid(head, load_public_key(site.directory / "audit_key.pub"))
    entries = site.guard.audit.entries()
    release = _releases(entries, spec.job_id)[-1]
    assert release["params"]["sha256"] == hashlib.sha256(raw.encode()).hexdigest()
    assert entries[head["seq"]]["hash"] == head["hash"]
    assert entries[head["seq"]]["action"] == "function_executed"  # the head before release
    assert head["seq"] < release["seq"]


@pytest.mark.parametrize("tamper", [_delete_first_release, _edit_first_release],
                         ids=["delete", "edit"])
def test_rewrite_resigned_with_the_site_key_is_caught_by_receipts(job_with_receipts, tmp_path,
                                                                   tamper):
    spec, site, receipts, snapshot = job_with_receipts
    copy = _site_copy(snapshot, tmp_path / "site")
    pinned = snapshot / "audit_key.pub"
    target = _releases([json.loads(x) for x in (copy / "audit.jsonl").read_text()
                        .splitlines()], spec.job_id)[0]["seq"]
    rewrite_history(copy, tamper(spec.job_id))

    # without receipts the rewrite is invisible: the chain, the head and the site accept it
    assert verify(copy, pinned).ok
    plain = _cli("audit", "verify", "--site", copy, "--public-key", pinned)
    assert plain.exit_code == 0, plain.stderr
    with AuditLog(copy, site.name) as reopened:
        assert reopened.verify().ok

    # the first receipt of this site at or past the rewritten entry no longer matches
    lines = [json.loads(x) for x in receipts.read_text().splitlines()]
    first_bad = next(n for n, r in enumerate(lines, start=1)
                     if r["site"] == site.name and r["audit_head"]["seq"] >= target)
    bad_seq = lines[first_bad - 1]["audit_head"]["seq"]
    line = _one_line_error(_cli("audit", "verify", "--site", copy, "--public-key", pinned,
                                "--receipts", receipts), code=1)
    assert f"receipt on line {first_bad} (site {site.name!r}, seq {bad_seq}" in line
    assert "rewritten" in line or "deleted" in line


def test_limit_entries_after_the_last_receipt_are_not_covered(job_with_receipts, tmp_path):
    """What the README says receipts cannot see: the last reply's own result_released."""
    spec, site, receipts, snapshot = job_with_receipts
    copy = _site_copy(snapshot, tmp_path / "site")

    def edit_last_release(entries: list[dict[str, Any]]) -> None:
        _releases(entries, spec.job_id)[-1]["params"]["recipient"] = "someone-else@uni.org"

    rewrite_history(copy, edit_last_release)
    result = _cli("audit", "verify", "--site", copy, "--receipts", receipts)
    assert result.exit_code == 0, result.stderr


def test_receipts_signed_by_another_key_do_not_pass(job_with_receipts, tmp_path):
    """Replacing the key as well (new key, new audit_key.pub) does not help the staff."""
    spec, site, receipts, snapshot = job_with_receipts
    copy = _site_copy(snapshot, tmp_path / "site")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    new_key = Ed25519PrivateKey.generate()
    (copy / "audit_key.pem").write_bytes(new_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (copy / "audit_key.pub").write_bytes(new_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    rewrite_history(copy, _delete_first_release(spec.job_id))
    assert verify(copy).ok  # against the replaced audit_key.pub next to the log
    line = _one_line_error(_cli("audit", "verify", "--site", copy, "--receipts", receipts), 1)
    assert "signature is not valid for the site's public key" in line


def _small_log(directory: Path, name: str = "clinic") -> Path:
    with AuditLog(directory, name) as log:
        log.append("system", "system", "site_provisioned", params={"syft_version": "0.9.5"})
    return directory


@pytest.mark.parametrize("content, problem", [
    ("{not json\n", "line 1 is not valid JSON"),
    ('{"site": "clinic"}\n', "line 1 is not a receipt (no audit_head object)"),
    ('{"site": "clinic", "audit_head": {"seq": 0}}\n', "line 1 is not a receipt (field"),
    ("", "holds no receipts"),
])
def test_malformed_receipts_file_is_exit_2_naming_the_file(tmp_path, content, problem):
    site = _small_log(tmp_path / "clinic")
    bad = tmp_path / "receipts.jsonl"
    bad.write_text(content)
    line = _one_line_error(_cli("audit", "verify", "--site", site, "--receipts", bad), 2)
    assert str(bad) in line and problem in line


def test_missing_or_foreign_receipts_are_exit_2(tmp_path):
    site = _small_log(tmp_path / "clinic")
    line = _one_line_error(_cli("audit", "verify", "--site", site, "--receipts",
                                tmp_path / "nowhere.jsonl"), 2)
    assert "cannot read receipts file" in line and "nowhere.jsonl" in line
    other = _small_log(tmp_path / "other", "other")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"site": "other", "audit_head": json.loads(
        (other / "audit.head.json").read_text())}) + "\n")
    line = _one_line_error(_cli("audit", "verify", "--site", site, "--receipts", foreign), 2)
    assert "no receipt of site 'clinic'" in line


def test_other_members_keep_receipts_that_catch_a_rewrite(job_with_receipts, tmp_path,
                                                          tmp_path_factory):
    """Each site keeps the signed heads the other members' contributions came with (checked
    against their audit keys in its own federation config): a rewrite at one site is caught
    with another site's receipts, without the data scientist."""
    spec, site, _, snapshot = job_with_receipts
    peer_file = next(tmp_path_factory.getbasetemp().glob(f"peer*/{PEER_RECEIPTS}"))
    kept = [json.loads(x) for x in peer_file.read_text().splitlines()]
    ours = [r for r in kept if r["site"] == site.name and r["job_id"] == spec.job_id]
    assert len(ours) >= 2  # the statistics and round 1 aggregates it verified
    pinned = snapshot / "audit_key.pub"
    intact = _site_copy(snapshot, tmp_path / "intact")
    ok = _cli("audit", "verify", "--site", intact, "--public-key", pinned,
              "--receipts", peer_file)
    assert ok.exit_code == 0, ok.stderr
    copy = _site_copy(snapshot, tmp_path / "site")
    rewrite_history(copy, _delete_first_release(spec.job_id))
    line = _one_line_error(_cli("audit", "verify", "--site", copy, "--public-key", pinned,
                                "--receipts", peer_file), code=1)
    assert f"site {site.name!r}" in line
