"""The audit trail of real datasites, and the compliance officer's read-only view of it."""

from __future__ import annotations

import hashlib
import json
import re
import stat

import pytest

from datasites.adapter import job_code
from datasites.errors import AuthenticationError
from datasites.governance.accounts import Role
from datasites.governance.audit import load_entries, verify
from datasites.governance.compliance import AuditorSession
from datasites.governance.guard import frame_fingerprint
from datasites.runtime.site_files import OFFICER_FILE, check_officer, store_officer
from fed_tasks.codec import dumps, loads
from fed_tasks.interface import SiteRefusedError
from fed_tasks.spec import JobSpec

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _spec(schema, **kw) -> JobSpec:
    return JobSpec(features=schema.features, label_column=schema.label, **kw)


def _about(entries, rid: str, job_id: str) -> list[dict]:
    """Entries about one request (by request id or job id), in log order."""
    return [e for e in entries if e["objects"].get("request_id") == rid
            or e["objects"].get("job_id") == job_id]


def _plain_evidence(action, rnd, replies):
    return {"kind": "plain", "action": action, "round": rnd,
            "contributions": [r["contribution"] for r in replies]}


def test_provisioning_and_publication_are_logged(federation, partitions):
    site = federation.sites[0]
    entries = load_entries(site.directory)
    assert entries[0]["action"] == "site_provisioned" and entries[0]["seq"] == 0
    registered = {e["params"]["email"]: e["params"]["role"] for e in entries
                  if e["action"] == "user_registered"}
    assert registered == {a.email: a.role.value for a in site.accounts.values()}
    published = [e for e in entries if e["action"] == "dataset_published"]
    assert len(published) == 1 and published[0]["actor"] == site.accounts[Role.DATA_OWNER].email
    assets = published[0]["params"]["assets"]
    train, test = partitions[0]
    assert assets["train"]["sha256"] == frame_fingerprint(train.reset_index(drop=True))
    assert assets["test"]["sha256"] == frame_fingerprint(test.reset_index(drop=True))
    assert assets["train"]["rows"] == len(train) and SHA256.match(assets["train"]["mock_sha256"])
    # written before the site could be used: provisioning, then accounts, then the data
    order = [e["action"] for e in entries[:6]]
    assert order == ["site_provisioned"] + ["user_registered"] * 4 + ["dataset_published"]


def test_full_job_audit_trail(federation, schema):
    """Submitted, approved, each call executed and released (with hashes), a refused call."""
    spec = _spec(schema, rounds=2, evaluations=1)
    session, peer = federation.sessions()[1], federation.sessions()[2]
    site = federation.site(session.site)
    rid = session.submit(spec)
    site.approve(rid, reason="covered by study 42")
    federation.site(peer.site).approve(peer.submit(spec))  # an aggregate needs two sites
    assets = session.assets()
    func = getattr(session.client.code, job_code.function_name(spec.job_id))
    raw_stats = func(train=assets["train"], test=assets["test"], action="stats",
                     payload=dumps({})).get()  # the exact string that left the site
    conn, other = session.connection(spec), peer.connection(spec)
    replies = [loads(raw_stats)["result"], other.call("stats", {})]
    evidence = _plain_evidence("stats", 0, replies)
    for rnd in (1, 2):
        message = {"round": rnd, "previous": evidence}
        evidence = _plain_evidence("fit", rnd, [c.call("fit", message) for c in (conn, other)])
    conn.call("evaluate", {"previous": evidence})
    # a third round is not in the approved job's schedule: refused before anything runs
    with pytest.raises(SiteRefusedError, match="fit pass 3 is outside this job's 1..2"):
        conn.call("fit", {"round": 3, "previous": evidence})

    trail = _about(site.guard.audit.entries(), rid, spec.job_id)
    assert [e["action"] for e in trail] == [
        "request_submitted", "request_approved",
        "function_executed", "result_released",  # stats
        "function_executed", "result_released",  # fit round 1
        "function_executed", "result_released",  # fit round 2
        "function_executed", "result_released",  # evaluate
        "call_refused",                          # fit round 3
    ]
    scientist, owner = federation.scientist.email, site.accounts[Role.DATA_OWNER].email
    code_hash = job_code.code_hash(site.review(rid).code)
    submitted, approved = trail[0], trail[1]
    assert submitted["actor"] == scientist and submitted["role"] == "data_scientist"
    assert submitted["code_hash"] == code_hash
    assert submitted["params"]["spec_fingerprint"] == spec.fingerprint
    assert submitted["objects"]["dataset_id"] == "records"
    assert approved["actor"] == owner and approved["params"]["reason"] == "covered by study 42"
    executed = [e for e in trail if e["action"] == "function_executed"]
    assert [(e["params"]["action"], e["params"]["call"], e["params"].get("round"))
            for e in executed] == [("stats", 1, None), ("fit", 1, 1), ("fit", 2, 2),
                                   ("evaluate", 1, None)]
    assert all(e["code_hash"] == code_hash and e["objects"]["job_id"] == spec.job_id
               for e in executed)
    released = [e for e in trail if e["action"] == "result_released"]
    assert all(e["params"]["recipient"] == scientist and e["params"]["bytes"] > 0
               and SHA256.match(e["params"]["sha256"]) for e in released)
    assert released[0]["params"]["sha256"] == hashlib.sha256(raw_stats.encode()).hexdigest()
    assert released[0]["params"]["bytes"] == len(raw_stats.encode())
    assert loads(raw_stats)["status"] == "ok"
    assert "fit pass 3 is outside this job's 1..2" in trail[-1]["params"]["reason"]
    # every entry was appended in order, before its effect, and the chain verifies
    seqs = [e["seq"] for e in trail]
    assert seqs == sorted(seqs)
    assert site.guard.audit.verify().ok

    officer = site.accounts[Role.COMPLIANCE_OFFICER]
    record = AuditorSession.login(site.directory, officer.email, officer.password).request(rid)
    assert record.status == "approved" and record.requester == scientist
    assert record.decisions[0].by == owner and record.decisions[0].reason == "covered by study 42"
    assert record.executed == {"stats": 1, "fit": 2, "evaluate": 1}
    assert record.used == record.limits == {"stats": 1, "fit": 2, "evaluate": 1}
    assert record.released == 4 and record.refused == 1 and record.code_hash == code_hash


def test_denials_overrides_and_refused_decisions_are_logged(federation, schema):
    spec = _spec(schema, rounds=1)
    session = federation.sessions()[2]
    site = federation.site(session.site)
    owner = site.accounts[Role.DATA_OWNER].email
    rid = session.submit(spec)
    site.deny(rid, "label use not covered")
    site.approve(rid, reason="ethics board agreed")  # replaces the denial
    with pytest.raises(PermissionError, match="already approved"):
        site.approve(rid)
    session.connection(spec).call("stats", {})
    site.deny(rid, "consent withdrawn")  # revokes the approval
    assert site.guard.approval(spec.job_id)["revoked"]["reason"] == "consent withdrawn"
    with pytest.raises(SiteRefusedError, match="consent withdrawn"):
        session.connection(spec).call("fit", {"round": 1})
    trail = _about(site.guard.audit.entries(), rid, spec.job_id)
    decisions = [(e["action"], e["actor"], e["params"].get("decision"), e["params"]["reason"])
                 for e in trail if e["action"].startswith("request_") and
                 e["action"] != "request_submitted"]
    assert decisions == [
        ("request_denied", owner, None, "label use not covered"),
        ("request_overridden", owner, "approved", "ethics board agreed"),
        ("request_overridden", owner, "denied", "consent withdrawn"),
    ]
    refused = [e for e in site.guard.audit.entries(action="call_refused")
               if e["actor"] == owner]
    assert any("already approved" in e["params"]["reason"] for e in refused)


def test_code_that_is_not_the_template_is_refused_and_logged(federation):
    import syft as sy

    session = federation.sessions()[0]
    site = federation.site(session.site)
    asset = session.assets()["train"]

    @sy.syft_function(input_policy=sy.MixedInputPolicy(client=session.client, data=asset),
                      output_policy=sy.SingleExecutionExactOutput())
    def copy_rows(data):
        return data

    rid = session.client.code.request_code_execution(copy_rows).id.no_dash
    with pytest.raises(PermissionError, match="cannot be approved"):
        site.approve(rid)
    entries = _about(site.guard.audit.entries(), rid, "-")
    assert entries[0]["action"] == "request_submitted"
    assert entries[0]["params"]["template_ok"] is False
    refused = site.guard.audit.entries(action="call_refused")[-1]
    assert refused["params"]["call"] == f"approve request {rid}"
    assert "cannot be approved: request code does not pin a fedsyft job spec" in \
        refused["params"]["reason"]


def test_wrong_syft_password_is_logged(federation):
    site = federation.sites[1]
    with pytest.raises(AuthenticationError):
        site.login(federation.scientist.email, "not-the-password")
    last = site.guard.audit.entries(action="login_failed")[-1]
    assert last["actor"] == federation.scientist.email and last["role"] == "data_scientist"
    assert last["params"]["reason"] == "wrong email or password"


# ---- the compliance officer ---------------------------------------------------------------
def test_officer_reads_verifies_and_exports(federation, tmp_path):
    site = federation.sites[0]
    officer = site.accounts[Role.COMPLIANCE_OFFICER]
    session = AuditorSession.login(site.directory, officer.email, officer.password)
    assert session.site == site.name and session.verify().ok
    entries = session.entries()
    assert entries == load_entries(site.directory)
    assert session.entries(since=entries[-1]["time"]) == [entries[-1]]
    assert session.entries(action="site_provisioned") == entries[:1]
    listed = {r.request_id for r in session.requests()}
    assert {r.request_id for r in site.requests()} <= listed
    assert session.requests(since="2999-01-01T00:00:00+00:00") == []
    out = session.export("json", tmp_path / "audit.json")
    doc = json.loads(out.read_text())
    assert doc["verify"]["ok"] and doc["site"] == site.name
    exported = load_entries(site.directory)[-1]  # the read itself is on record, logged
    assert exported["action"] == "audit_exported" and exported["actor"] == officer.email
    assert exported["params"]["entries"] == len(doc["entries"])  # after the file was written


def test_officer_cannot_approve_deny_submit_run_or_read_data(federation):
    site = federation.sites[0]
    officer = site.accounts[Role.COMPLIANCE_OFFICER]
    session = AuditorSession.login(site.directory, officer.email, officer.password)
    for forbidden in ("approve", "deny", "submit", "run", "call", "review", "client",
                      "server", "guard", "datasets", "mock", "owner_client", "connection"):
        assert not hasattr(session, forbidden), forbidden
    with pytest.raises(AttributeError):
        session.client = site.owner_client()  # no place to smuggle a syft client in
    assert not any("Datasite" in type(getattr(session, s, None)).__name__
                   for s in type(session).__slots__)
    # the officer is not a syft user: no syft session, hence no code requests and no mocks
    with pytest.raises(AuthenticationError, match="wrong email or password"):
        site.login(officer.email, officer.password)
    assert officer.email not in {r.requester for r in site.requests()}


def test_wrong_officer_password_is_refused_and_logged(federation):
    site = federation.sites[2]
    officer = site.accounts[Role.COMPLIANCE_OFFICER]
    with pytest.raises(AuthenticationError, match=r"cannot log in to site 'hospital-c' as "
                                                  r"compliance officer .*wrong email or password"):
        AuditorSession.login(site.directory, officer.email, "not-the-password")
    with pytest.raises(AuthenticationError):
        AuditorSession.login(site.directory, "someone@else.org", officer.password)
    failed = site.guard.audit.entries(action="login_failed")[-2:]
    assert [(e["actor"], e["role"]) for e in failed] == [
        (officer.email, "compliance_officer"), ("someone@else.org", "compliance_officer")]
    # written through the running site's own writer: one log, one writer, chain intact
    assert site.guard.audit.count == verify(site.directory).entries
    assert site.guard.audit.verify().ok


def test_officer_password_is_a_salted_scrypt_hash(tmp_path):
    store_officer(tmp_path, "dpo@clinic.org", "correct horse battery")
    doc = json.loads((tmp_path / OFFICER_FILE).read_text())
    assert doc["kdf"] == "scrypt" and doc["n"] >= 2**14
    assert "correct horse" not in (tmp_path / OFFICER_FILE).read_text()
    assert stat.S_IMODE((tmp_path / OFFICER_FILE).stat().st_mode) == 0o600
    assert check_officer(tmp_path, "dpo@clinic.org", "correct horse battery")
    assert not check_officer(tmp_path, "dpo@clinic.org", "correct horse batterY")
    assert not check_officer(tmp_path, "x@clinic.org", "correct horse battery")
    first = doc["hash"]
    store_officer(tmp_path, "dpo@clinic.org", "correct horse battery")
    assert json.loads((tmp_path / OFFICER_FILE).read_text())["hash"] != first  # fresh salt
    with pytest.raises(ValueError, match="at least 8"):
        store_officer(tmp_path, "dpo@clinic.org", "short")


def test_every_site_log_verifies_with_its_pinned_key(federation):
    for site in federation.sites:
        pinned = (site.directory / "audit_key.pub").read_bytes()
        report = verify(site.directory, pinned)
        assert report.ok, (site.name, report.problem)
        assert report.entries > 6
