"""Real in-process PySyft datasites: provisioning, privacy of rows, approval and limits."""

from __future__ import annotations

import numpy as np
import pytest

from datasites.adapter.syft_server import sy
from datasites.errors import AuthenticationError, ProvisioningError
from datasites.governance.accounts import Account, Role
from datasites.runtime.tables import TableError
from fed_tasks.interface import SiteRefusedError
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec


def _spec(schema, **kw) -> JobSpec:
    return JobSpec(features=schema.features, label_column=schema.label, **kw)


def _stats_evidence(spec, site):
    """A (forged, unsigned) statistics aggregate: enough for calls that must be refused
    before any evidence is checked."""
    return {"kind": "plain", "action": "stats", "round": 0, "contributions": []}


def test_default_syft_root_credentials_are_gone(federation):
    site = federation.sites[0]
    with pytest.raises(AuthenticationError, match="wrong email or password"):
        site.login("info@openmined.org", "changethis")
    root = site.accounts[Role.ADMIN]
    assert root.password != "changethis"
    assert site.login(root.email, root.password) is not None


def test_wrong_password_is_a_clear_error(federation):
    with pytest.raises(AuthenticationError, match=r"cannot log in to site 'hospital-a'"):
        federation.sites[0].login(federation.scientist.email, "not-the-password")


def test_scientist_cannot_read_a_private_row(federation, partitions):
    session = federation.sessions()[0]
    train_asset = session.assets()["train"]
    with pytest.raises(Exception, match="not found|permission|denied"):
        train_asset.pointer.get()
    with pytest.raises(Exception, match="not found|permission|denied"):
        session.client.api.services.action.get(train_asset.action_id)
    assert train_asset.data is None
    mock = session.mock("train")
    private_rows = set(map(tuple, partitions[0][0].to_numpy().tolist()))
    assert not any(tuple(r) in private_rows for r in mock.to_numpy().tolist())


def test_unapproved_request_does_not_run(federation, schema):
    spec = _spec(schema, rounds=1)
    session = federation.sessions()[1]
    session.submit(spec)
    site = federation.site(session.site)
    with pytest.raises(SiteRefusedError, match="waiting for approval|pending"):
        session.connection(spec).call("fit", {"round": 1,
                                              "previous": _stats_evidence(spec, site)})
    assert site.guard.approval(spec.job_id) is None


def test_denied_request_does_not_run_and_reason_reaches_scientist(federation, schema):
    spec = _spec(schema, rounds=1)
    session = federation.sessions()[2]
    rid = session.submit(spec)
    federation.site(session.site).deny(rid, "label use not covered by our ethics approval")
    with pytest.raises(SiteRefusedError, match="ethics approval"):
        session.connection(spec).call("stats", {})


def test_deny_needs_a_reason(federation, schema):
    spec = _spec(schema, rounds=1)
    rid = federation.sessions()[2].submit(spec)
    with pytest.raises(ValueError, match="reason"):
        federation.sites[2].deny(rid, "  ")


def test_call_past_approved_rounds_is_refused_and_counts_stay(federation, schema, drive):
    spec = _spec(schema, rounds=2)
    session, other = federation.sessions()[:2]
    site = federation.site(session.site)
    for s in (session, other):
        federation.site(s.site).approve(s.submit(spec))
    conn = session.connection(spec)
    agg = drive([conn, other.connection(spec)], spec, 2)
    # a third round is not in the approved job's schedule: refused before anything runs
    with pytest.raises(SiteRefusedError, match="fit pass 3 is outside this job's 1..2"):
        conn.call("fit", {"round": 3, "previous": agg.evidence()})
    assert site.guard.approval(spec.job_id)["used"]["fit"] == 2
    with pytest.raises(SiteRefusedError, match="aggregate 0 is out of order"):
        conn.call("stats", {})


def test_code_that_is_not_the_template_cannot_be_approved(federation):
    session = federation.sessions()[0]
    site = federation.site(session.site)
    asset = session.assets()["train"]

    @sy.syft_function(input_policy=sy.MixedInputPolicy(client=session.client, data=asset),
                      output_policy=sy.SingleExecutionExactOutput())
    def leak_rows(data):
        return data

    rid = session.client.code.request_code_execution(leak_rows).id.no_dash
    review = site.review(rid)
    assert not review.template_ok and "NOT the fedsyft job template" in review.plain_words()
    with pytest.raises(PermissionError, match="cannot be approved"):
        site.approve(rid)
    with pytest.raises(Exception, match="approval|pending"):
        session.client.code.leak_rows(data=asset)


def test_review_is_in_plain_words(federation, schema):
    spec = _spec(schema, rounds=4)
    session = federation.sessions()[1]
    rid = session.submit(spec)
    text = federation.site(session.site).review(rid).plain_words()
    assert "at most 4 rounds" in text and "f9" in text and "label column 'anomaly'" in text


def test_syft_training_equals_in_memory_training(federation, partitions, schema):
    """The approved code really runs our site step on the private tables."""
    spec = _spec(schema, rounds=2)
    federation.approve_all(federation.submit(spec))
    via_syft = FederatedTrainer(spec, federation.connections(spec), progress=False)
    result = via_syft.fit()
    per_site = via_syft.evaluate(result)
    local = FederatedTrainer(spec, [LocalSite(n.name, spec, tr, te) for n, (tr, te) in
                                    zip(federation.sites, partitions, strict=True)],
                             progress=False)
    expected = local.fit()
    assert np.allclose(result.weights, expected.weights, atol=1e-6)
    for got, want in zip(per_site, local.evaluate(expected), strict=True):
        assert got["roc_auc"] == pytest.approx(want["roc_auc"], abs=1e-9)
    with pytest.raises(SiteRefusedError, match="evaluate"):
        via_syft.evaluate(result)  # one evaluation was approved


def test_bad_site_table_leaves_nothing_behind(tmp_path, partitions, schema):
    from datasites.runtime.datasite import Datasite

    train, test = partitions[0]
    scientist = Account("ds@x.org", Role.DATA_SCIENTIST, "pw-123456789")
    with pytest.raises(TableError, match="missing columns"):
        Datasite.provision("clinic-z", tmp_path / "z", train=train.drop(columns="f2"),
                           test=test, schema=schema, scientist=scientist)
    assert not (tmp_path / "z").exists()


def test_failed_provisioning_stops_and_removes_the_site(tmp_path, partitions, schema):
    from datasites.governance.guard import is_registered
    from datasites.runtime.datasite import Datasite

    train, test = partitions[0]
    bad = Account("not-an-email", Role.DATA_SCIENTIST, "pw-123456789")
    with pytest.raises(ProvisioningError, match="clinic-y"):
        Datasite.provision("clinic-y", tmp_path / "y", train=train, test=test, schema=schema,
                           scientist=bad)
    assert not (tmp_path / "y").exists() and not is_registered("clinic-y")
