"""What reaches a site is on its record within seconds, whatever its owner does.

Before, a submitted request was logged only when the owner happened to list requests, and an
account registered in syft only when the site next looked at its users: a request the owner
never opened left no trace. Each running site now watches syft's requests and users
(``Datasite.start_watching``, every 2 s by default).
"""

from __future__ import annotations

import time

from datasites.adapter.syft_server import ServiceRole
from datasites.governance.accounts import Role
from datasites.governance.audit import Action, load_entries
from fed_tasks.spec import JobSpec


def _wait_for(directory, action, match, seconds: float = 20.0) -> dict | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for entry in load_entries(directory):
            if entry["action"] == action and match(entry):
                return entry
        time.sleep(0.25)
    return None


def test_a_request_is_logged_without_the_owner_looking(federation, schema):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=1)
    session = federation.sessions()[1]
    rid = session.submit(spec)  # the owner does nothing at all
    site = federation.site(session.site)
    entry = _wait_for(site.directory, Action.REQUEST_SUBMITTED,
                      lambda e: e["objects"].get("request_id") == rid)
    assert entry is not None and entry["objects"]["job_id"] == spec.job_id
    assert entry["actor"] == federation.scientist.email


def test_an_account_registered_in_syft_is_logged_without_the_owner_looking(federation):
    site = federation.sites[2]
    root = site.accounts[Role.ADMIN]
    admin = site.login(root.email, root.password)
    email = "visiting-researcher@uni.edu"
    res = admin.users.create(email=email, name="visitor", password="visitor-pass-123",
                             password_verify="visitor-pass-123", role=ServiceRole.DATA_SCIENTIST)
    assert getattr(res, "email", None) == email, res
    entry = _wait_for(site.directory, Action.USER_REGISTERED,
                      lambda e: e["params"].get("email") == email)
    assert entry is not None and entry["params"]["seen_in"] == "syft user list"


def test_what_syft_refuses_a_scientist_is_logged(federation):
    """The scientist tries to read the private table through syft: syft refuses, and the
    site's log says who tried what (before, only syft's own server log knew)."""
    session = federation.sessions()[0]
    site = federation.site(session.site)
    before = len(site.guard.audit.entries(action=Action.CALL_REFUSED))
    asset = session.assets()["train"]
    try:
        asset.pointer.get()
    except Exception:  # noqa: BLE001 - syft raises or returns an error; either is a refusal
        pass
    refused = site.guard.audit.entries(action=Action.CALL_REFUSED)[before:]
    mine = [e for e in refused if e["params"].get("refused_by") == "syft"]
    assert mine and mine[0]["actor"] == federation.scientist.email
    assert mine[0]["params"]["call"].startswith("syft ")
