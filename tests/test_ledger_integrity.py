"""The privacy ledger and the policy file against the signed audit log (issue 11).

Deleting or editing ``privacy_ledger.json`` must not reset a dataset's spent epsilon, and a
deleted ``policy.json`` must not fall back to the default policy: a site whose files
disagree with its log refuses to open (one line naming the file, nothing written), and
``fedsyft site repair`` rebuilds them from the verified log.

One small provisioned site for the module; its budget is spent through the site's real
charge path (``SitePrivacy.charge``: ledger, then ``budget_charged``) and its policy changed
through the owner's ``set_policy``. Every test damages a file, checks the refusal, repairs
through the real CLI (in-process: syft is imported already) and leaves the site consistent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from datasites.cli.main import app
from datasites.governance.accounts import Account, Role
from datasites.governance.audit import load_entries, verify
from datasites.governance.ledger_check import SiteStateMismatch
from fed_tasks.spec import JobSpec

NAME = "ledger-clinic"
OWNER_PW = "ledger-owner-pass-77"
OFFICER_PW = "ledger-officer-pass-78"


@pytest.fixture(scope="module")
def clinic(partitions, schema, tmp_path_factory):
    """A provisioned site that has spent epsilon on two DP jobs and changed its policy."""
    from datasites.runtime.datasite import Datasite

    directory = tmp_path_factory.mktemp("ledger") / NAME
    scientist = Account("ds@uni.org", Role.DATA_SCIENTIST, "scientist-pass-1")
    train, test = partitions[0]
    site = Datasite.provision(NAME, directory, train=train, test=test, schema=schema,
                              scientist=scientist, owner_password=OWNER_PW,
                              officer_password=OFFICER_PW)
    try:
        site.set_policy(epsilon_budget=50.0, max_rounds=7, reason="study budget")
        specs = [JobSpec(features=schema.features, label_column=schema.label, rounds=3,
                         dp_epsilon=eps, dp_clip=0.5) for eps in (2.0, 3.0)]
        for spec in specs:
            for rnd in (1, 2):  # two of three releases each
                site.guard.privacy.charge(spec, len(train), {"request_id": "r-" + spec.job_id},
                                          rnd)
        spent = site.guard.privacy.ledger.spent("records")
        ledger = site.guard.privacy.ledger.snapshot()
        policy = site.policy()
    finally:
        site.close()
    assert spent > 0 and policy.max_rounds == 7
    return SimpleNamespace(dir=directory, owner=f"owner@{NAME}.site", spent=spent,
                           ledger=ledger, policy=policy, specs=specs)


def _open(clinic):
    from datasites.runtime.datasite import Datasite

    return Datasite.open(clinic.dir, clinic.owner, OWNER_PW)


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _cli(*args: object):
    env = {"FEDSYFT_OWNER_PASSWORD": OWNER_PW, "FEDSYFT_OFFICER_PASSWORD": OFFICER_PW}
    return CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args], env=env)


def _refused(clinic, *needles: str) -> str:
    """Open is refused with one line holding ``needles``; the directory is left unchanged,
    through the library and through the owner's CLI alike."""
    before = _digests(clinic.dir)
    with pytest.raises(SiteStateMismatch) as info:
        _open(clinic)
    message = str(info.value)
    assert "\n" not in message and "fedsyft site repair --site" in message
    for needle in needles:
        assert needle in message, message
    result = _cli("requests", "list", "--site", clinic.dir)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needles[0] in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert _digests(clinic.dir) == before  # a refused open writes nothing
    return message


def _repair(clinic, rebuilt: str) -> None:
    count = len(load_entries(clinic.dir))
    result = _cli("site", "repair", "--site", clinic.dir)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert f"rebuilt {rebuilt} from the signed audit log" in result.stdout
    entries = load_entries(clinic.dir)
    [entry] = [e for e in entries[count:] if e["action"] == "site_state_rebuilt"]
    assert entry["actor"] == clinic.owner and entry["params"]["files"] == [rebuilt]
    assert verify(clinic.dir).ok


def _assert_restored(clinic) -> None:
    site = _open(clinic)  # opens again, with what the log says
    try:
        assert site.guard.privacy.ledger.spent("records") == pytest.approx(clinic.spent,
                                                                           rel=1e-12)
        held = site.guard.privacy.ledger.snapshot()["datasets"]["records"]
        want = clinic.ledger["datasets"]["records"]
        assert held["delta_spent"] == pytest.approx(want["delta_spent"])
        for job_id, job in want["jobs"].items():
            assert held["jobs"][job_id]["releases"] == job["releases"]
            assert held["jobs"][job_id]["epsilon"] == pytest.approx(job["epsilon"])
            assert held["jobs"][job_id]["charges"] == pytest.approx(job["charges"])
        assert site.policy() == clinic.policy
    finally:
        site.close()


def test_a_fresh_site_opens_and_its_initial_policy_is_on_record(clinic):
    entries = load_entries(clinic.dir)
    changes = [e for e in entries if e["action"] == "policy_changed"]
    assert changes[0]["params"]["old"] is None  # logged at publication
    assert changes[-1]["params"]["new"]["max_rounds"] == 7
    assert _cli("site", "repair", "--site", clinic.dir).stdout.count("nothing to repair") == 1
    _assert_restored(clinic)


def test_deleted_ledger_is_refused_and_rebuilt_with_the_same_spent_epsilon(clinic):
    (clinic.dir / "privacy_ledger.json").unlink()
    _refused(clinic, "privacy_ledger.json is missing", "4 budget charge(s)")
    _repair(clinic, "privacy_ledger.json")
    _assert_restored(clinic)


def test_ledger_edited_down_is_refused_and_rebuilt(clinic):
    path = clinic.dir / "privacy_ledger.json"
    doc = json.loads(path.read_text())
    doc["datasets"]["records"]["epsilon_spent"] = 0.01  # "budget reset"
    path.write_text(json.dumps(doc))
    _refused(clinic, "privacy_ledger.json says dataset 'records' spent epsilon 0.01",
             f"records {clinic.spent:.6g}")
    _repair(clinic, "privacy_ledger.json")
    _assert_restored(clinic)
    job_id = clinic.specs[1].job_id  # a job's own releases reset: its next charge too small
    doc = json.loads(path.read_text())
    doc["datasets"]["records"]["jobs"][job_id].update(releases=0, epsilon=0.0)
    path.write_text(json.dumps(doc))
    _refused(clinic, f"says job {job_id!r} was charged epsilon 0 in 0 release(s)")
    _repair(clinic, "privacy_ledger.json")
    _assert_restored(clinic)


def test_unreadable_ledger_is_refused_and_rebuilt(clinic):
    (clinic.dir / "privacy_ledger.json").write_text('{"datasets": {"records": []}}')
    _refused(clinic, "privacy_ledger.json is malformed")
    _repair(clinic, "privacy_ledger.json")
    _assert_restored(clinic)


def test_deleted_policy_is_refused_and_the_last_logged_policy_restored(clinic):
    (clinic.dir / "policy.json").unlink()
    _refused(clinic, "policy.json is missing", "the policy of 'records'")
    _repair(clinic, "policy.json")
    _assert_restored(clinic)
    doc = json.loads((clinic.dir / "policy.json").read_text())
    assert "Private table of ledger-clinic" in doc["descriptions"]["records"]  # from the log


def test_edited_policy_is_refused_naming_the_field(clinic):
    path = clinic.dir / "policy.json"
    doc = json.loads(path.read_text())
    doc["datasets"]["records"]["epsilon_budget"] = 1e6
    path.write_text(json.dumps(doc))
    _refused(clinic, "policy.json holds a policy for dataset 'records' that differs",
             "epsilon_budget 1000000.0 instead of 50.0")
    _repair(clinic, "policy.json")
    _assert_restored(clinic)


def test_malformed_policy_is_one_line_and_rebuilt(clinic):
    (clinic.dir / "policy.json").write_text("[1, 2]")
    _refused(clinic, "policy.json is unreadable")
    _repair(clinic, "policy.json")
    _assert_restored(clinic)


def test_a_ledger_ahead_of_the_log_is_accepted(clinic):
    """A charge is written just before its log entry; a failed append leaves the ledger
    ahead of the log, which is conservative (more spent), so the site still opens."""
    path = clinic.dir / "privacy_ledger.json"
    original = path.read_text()
    doc = json.loads(original)
    doc["datasets"]["records"]["epsilon_spent"] += 0.5
    path.write_text(json.dumps(doc))
    try:
        site = _open(clinic)
        try:
            assert site.guard.privacy.ledger.spent("records") == pytest.approx(
                clinic.spent + 0.5)
        finally:
            site.close()
    finally:
        path.write_text(original)
