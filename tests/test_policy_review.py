"""The data owner's policy and review at real datasites (the session federation).

Each test that changes a site's policy restores the permissive default before it ends, so
the other tests of the session keep the federation they expect.
"""

from __future__ import annotations

import contextlib

import pytest

from datasites.adapter.syft_server import sy
from datasites.governance.audit import Action
from datasites.governance.policy import DatasetPolicy
from fed_tasks.interface import SiteRefusedError
from fed_tasks.spec import JobSpec


def _spec(schema, **kw) -> JobSpec:
    return JobSpec(features=schema.features, label_column=schema.label, **kw)


@contextlib.contextmanager
def _policy(site, **changes):
    site.set_policy(reason="test", **changes)
    try:
        yield
    finally:
        site.set_policy(DatasetPolicy(), reason="test over: back to the default")


def test_scientist_reads_the_policy_the_owner_sets(federation):
    site, session = federation.sites[1], federation.sessions()[1]
    assert session.policy() == DatasetPolicy()  # published with the dataset
    with _policy(site, max_rounds=7, require_dp=True, epsilon_budget=4.0):
        policy = session.policy()
        assert (policy.max_rounds, policy.require_dp, policy.epsilon_budget) == (7, True, 4.0)
        text = session.dataset_description()
        assert "at most 7 training rounds" in text and "differential privacy required" in text
        changed = site.guard.audit.entries(action=Action.POLICY_CHANGED)[-1]
        assert changed["params"]["new"]["max_rounds"] == 7
        assert changed["actor"] == site.operator.email
    assert session.policy() == DatasetPolicy()


def test_scientist_cannot_change_the_policy(federation):
    from datasites.runtime.datasite import Datasite

    site = federation.sites[1]
    as_scientist = Datasite(site.name, site.directory, site.server, site.accounts, site.guard,
                            operator=federation.scientist)
    with pytest.raises(PermissionError, match="only the site's data owner"):
        as_scientist.set_policy(max_rounds=1000)
    assert site.policy() == DatasetPolicy()


POLICY_CASES = [
    ({"max_rounds": 5}, {"rounds": 6}, "6 rounds exceed the maximum of 5"),
    ({"allowed_models": ("iforest",)}, {}, "model 'ae' is not allowed"),
    ({"require_dp": True}, {}, "differential privacy is required"),
    ({"min_sites": 3}, {"min_sites": 2}, "below the policy's minimum of 3 sites"),
    ({"max_clip": 0.5}, {"dp_epsilon": 1.0, "dp_clip": 2.0}, "dp_clip=2 exceeds"),
    ({"epsilon_budget": 2.0}, {"dp_epsilon": 3.0}, "remaining privacy budget 2"),
    ({"allowed_submitters": ("pi@hospital.org",)}, {}, "may not submit jobs"),
    ({"max_params": 1000}, {}, "1,837 parameters, more than the maximum of 1,000"),
    ({"min_batch": 512}, {"batch_size": 32}, "batch size 32 is below the minimum of 512"),
]


@pytest.mark.parametrize(("policy", "job", "reason"), POLICY_CASES,
                         ids=["rounds", "model", "dp", "sites", "clip", "budget", "submitter",
                              "params", "batch"])
def test_job_breaking_the_policy_is_refused_at_request_time(federation, schema, policy, job,
                                                            reason):
    site, session = federation.sites[1], federation.sessions()[1]
    job, policy = dict(job), dict(policy)
    if "epsilon_budget" in policy:  # the session's earlier DP jobs spent some: leave this much
        policy["epsilon_budget"] += site.guard.privacy.ledger.spent("records")
    spec = _spec(schema, rounds=job.pop("rounds", 2), **job)
    with _policy(site, **policy):
        rid = session.submit(spec)
        review = site.review(rid)
        assert any(reason in v for v in review.violations)
        assert "POLICY VIOLATIONS" in review.plain_words() and reason in review.plain_words()
        with pytest.raises(PermissionError, match=f"breaks the policy.*{reason}"):
            site.approve(rid)
        assert site.guard.approval(spec.job_id) is None
        refused = site.guard.audit.entries(action=Action.CALL_REFUSED)[-1]
        assert reason in refused["params"]["reason"]
    assert site.review(rid).status == "pending"
    with pytest.raises(SiteRefusedError):
        session.connection(spec).call("stats", {})


def test_policy_tightened_after_approval_stops_the_job(federation, schema):
    site, session = federation.sites[1], federation.sessions()[1]
    spec = _spec(schema, rounds=3)
    site.approve(session.submit(spec))
    with _policy(site, max_rounds=2):
        with pytest.raises(SiteRefusedError, match="current policy.*3 rounds exceed"):
            session.connection(spec).call("stats", {})
    assert site.guard.approval(spec.job_id)["used"]["stats"] == 0  # refused calls are free


def test_review_lists_model_rounds_epsilon_aggregation_and_columns(federation, schema):
    site, session = federation.sites[0], federation.sessions()[0]
    spec = _spec(schema, rounds=4, dp_epsilon=2.5, dp_clip=0.7, aggregation="paillier")
    text = site.review(session.submit(spec)).plain_words()
    for words in ("dense autoencoder", "at most 4 rounds", "epsilon 2.5 at delta 1e-05",
                  "clipped to L2 norm 0.7", "1/2 of the noise variance", "aggregation paillier",
                  "columns touched: 9 features", "'f9'", "label column 'anomaly'",
                  "privacy budget: dataset 'records' has spent epsilon",
                  # 2 sites cannot carry client-level noise: the owner reads it, and why
                  "noise vs signal: noise-to-signal ratio", "expect a useless model",
                  "POLICY VIOLATIONS", "the DP noise would swamp the signal"):
        assert words in text, words


def test_a_site_refuses_noise_that_swamps_the_signal_or_runs_it_with_a_warning(federation,
                                                                               schema):
    """Both sides of the owner's ``noisy_dp``: refused with the computed ratio at approval
    and at every call; with "warn" the review says so and the job runs."""
    from fed_tasks import dp_usefulness

    site, session = federation.sites[0], federation.sessions()[0]
    spec = _spec(schema, rounds=2, dp_epsilon=3.0, aggregation="plain", min_sites=2)
    ratio = f"noise-to-signal ratio {dp_usefulness.estimate(spec).ratio:.3g}"
    rid = session.submit(spec)
    with pytest.raises(PermissionError, match=ratio):
        site.approve(rid)
    with _policy(site, noisy_dp="warn"):
        text = site.review(rid).plain_words()
        assert f"WARNING: the DP noise would swamp the signal: {ratio}" in text
        assert "runs it anyway" in text and "policy: the job complies" in text
        site.approve(rid)
        stats = session.connection(spec).call("stats", {})  # the job runs
        assert "contribution" in stats or "vector" in stats
    with pytest.raises(Exception, match=ratio):  # the owner's default again: refused
        session.connection(spec).call("stats", {})


def _request(session, func) -> str:
    return session.client.code.request_code_execution(func).id.no_dash


def test_non_template_code_is_flagged_and_approved_only_by_a_recorded_override(federation):
    site, session = federation.sites[2], federation.sessions()[2]
    asset = session.assets()["train"]
    policy = sy.MixedInputPolicy(client=session.client, data=asset)

    @sy.syft_function(input_policy=policy, output_policy=sy.SingleExecutionExactOutput())
    def returns_rows(data):
        return data

    @sy.syft_function(input_policy=policy, output_policy=sy.SingleExecutionExactOutput())
    def reads_a_file(data):
        return open("/etc/hostname").read()

    @sy.syft_function(input_policy=policy, output_policy=sy.SingleExecutionExactOutput())
    def opens_a_socket(data):
        import socket

        return socket.create_connection(("127.0.0.1", 9)).recv(10)

    ids = [_request(session, f) for f in (returns_rows, reads_a_file, opens_a_socket)]
    for rid in ids:
        review = site.review(rid)
        assert not review.template_ok and "NOT the fedsyft job template" in review.plain_words()
        assert "override_reason" in review.plain_words()
        with pytest.raises(PermissionError, match="cannot be approved.*override_reason"):
            site.approve(rid)
        assert site.review(rid).status == "pending"
    with _policy(site, require_dp=True):  # arbitrary code cannot be held to DP
        with pytest.raises(PermissionError, match="requires differential privacy"):
            site.approve(ids[1], override_reason="we trust this one")
    site.approve(ids[1], override_reason="hostname check agreed with the scientist by phone")
    assert site.review(ids[1]).status == "approved"
    entry = site.guard.audit.entries(action=Action.REQUEST_OVERRIDDEN)[-1]
    assert entry["objects"]["request_id"] == ids[1] and entry["params"]["template_ok"] is False
    assert entry["params"]["reason"] == "hostname check agreed with the scientist by phone"
    unaccounted = site.privacy_spent()["unaccounted"]
    assert unaccounted[-1]["request_id"] == ids[1]
    for rid in (ids[0], ids[2]):
        site.deny(rid, "not the fedsyft template")


def test_review_states_the_model_shape_against_the_sites_rows(federation, schema, partitions):
    """A first layer nearly as wide as the table is the shape of a model built to memorize
    rows: the owner reads the parameter count, the width against her row count, the batch
    and the trim before she approves."""
    site, session = federation.sites[0], federation.sessions()[0]
    rows = len(partitions[0][0])
    wide = _spec(schema, hidden=(rows, 8), batch_size=8, trim=0.0)
    text = site.review(session.submit(wide)).plain_words()
    assert f"first layer {rows} units for {rows:,} private training rows (WIDE" in text
    assert "batch 8, trim 0" in text
    normal = site.review(session.submit(_spec(schema))).plain_words()
    assert "model shape: 1,837 parameters; first layer 32 units" in normal
    assert "WIDE" not in normal


def test_a_job_naming_columns_outside_the_published_schema_is_refused(federation, schema):
    site, session = federation.sites[0], federation.sessions()[0]
    spec = JobSpec(features=(*schema.features[:-1], "ssn"), label_column=schema.label)
    rid = session.submit(spec)
    assert "columns ['ssn'] are not in the published table's schema" in \
        site.review(rid).plain_words()
    with pytest.raises(PermissionError, match="not in the published table's schema"):
        site.approve(rid)
