"""The data scientist trains over HTTP against running datasite servers (``fedsyft up``)
and gets the in-process model; the site's guard, ledger and audit live in its server."""

from __future__ import annotations

import numpy as np
import pytest

from datasites.deploy.remote import NotApprovedError, OwnerClient, RemoteFederation
from datasites.governance.guard import guarded_directories
from fed_tasks.interface import SiteRefusedError
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec

from .conftest import PASSWORDS


def _spec(schema, aggregation: str, rounds: int = 2, seed: int = 0) -> JobSpec:
    return JobSpec(model="ae", features=schema.features, label_column=schema.label,
                   rounds=rounds, seed=seed, aggregation=aggregation, min_sites=2)


def scientist(cfg) -> RemoteFederation:
    return RemoteFederation.connect(cfg, password=PASSWORDS["FEDSYFT_SCIENTIST_PASSWORD"])


def owner(cfg, name: str) -> OwnerClient:
    member = cfg.member(name)
    return OwnerClient(member, member.owner, PASSWORDS["FEDSYFT_OWNER_PASSWORD"])


def approve_everywhere(cfg, ids: dict[str, str]) -> None:
    for name, rid in ids.items():
        owner(cfg, name).approve(rid, reason="test")


def in_process(spec: JobSpec, partitions, names) -> FederatedTrainer:
    plain = JobSpec.model_validate({**spec.model_dump(), "aggregation": "plain"})
    return FederatedTrainer(plain, [LocalSite(n, plain, tr, te) for n, (tr, te) in
                                    zip(names, partitions, strict=True)], progress=False)


@pytest.mark.parametrize("aggregation, atol", [("plain", 1e-6), ("secagg", 1e-4),
                                               ("paillier", 1e-4)])
def test_http_training_equals_in_process(deployed, partitions, schema, aggregation, atol):
    fed = scientist(deployed)
    spec = _spec(schema, aggregation)
    ids = fed.submit(spec)
    assert set(ids) == set(fed.site_names) | ({"key-authority"} if aggregation == "paillier"
                                              else set())
    with pytest.raises(NotApprovedError, match="not approved yet"):
        fed.wait_for_approval(spec)
    approve_everywhere(deployed, ids)
    fed.wait_for_approval(spec)
    trainer = fed.trainer(spec, progress=False)
    result = trainer.fit()
    reference = in_process(spec, partitions, fed.site_names)
    expected = reference.fit()
    assert result.rounds_completed == 2
    np.testing.assert_allclose(result.weights, expected.weights, atol=atol)
    for got, want in zip(trainer.evaluate(result), reference.evaluate(expected), strict=True):
        assert got["site"] == want["site"]
        assert got["roc_auc"] == pytest.approx(want["roc_auc"], abs=1e-3)


def test_the_guard_runs_in_the_site_server_not_in_the_client(deployed, schema):
    """Nothing of the site's enforcement is in the scientist's process, and the server
    refuses a call of a job its owner has not approved, over HTTP."""
    fed = scientist(deployed)
    served = {m.directory.resolve() for m in deployed.members}
    assert served and not served & guarded_directories()  # (in-process sites may run here)
    spec = _spec(schema, "plain", seed=7)
    fed.submit(spec)
    with pytest.raises(SiteRefusedError):
        fed.connections(spec)[0].call("stats", {})
    before = owner(deployed, fed.site_names[0]).requests()
    assert any(r.job_id == spec.job_id and r.status == "pending" for r in before)


def test_an_owner_with_a_wrong_password_is_refused_and_logged(deployed):
    from datasites.deploy.remote import OwnerError

    member = deployed.site[0]
    with pytest.raises(OwnerError, match="wrong email or password"):
        OwnerClient(member, member.owner, "not-her-password-123").requests()
    from datasites.governance.audit import load_entries

    failed = [e for e in load_entries(member.directory) if e["action"] == "login_failed"]
    assert failed and failed[-1]["actor"] == member.owner
