"""No free queries: what a call on private data reveals is counted, whatever its outcome.

Before: a call whose encoded update overflowed returned an error and was refunded, so the
scientist could ask "is some private value large?" as often as she liked. Now values are
clipped at the site (the count stated in the reply), every call that ran the private step is
counted, and a failure after that point says one fixed sentence.
"""

from __future__ import annotations

import pytest

from datasites.runtime.site_entry import STEP_FAILED
from fed_tasks.interface import SiteRefusedError
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec


class _Recorder:
    """A site connection that keeps every reply the scientist receives."""

    def __init__(self, conn):
        self.conn, self.name, self.replies = conn, conn.name, []

    def call(self, action, message):
        reply = self.conn.call(action, message)
        self.replies.append((action, reply))
        return reply


def test_overflowing_updates_are_clipped_counted_and_never_refunded(federation, schema):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=2,
                   aggregation="secagg", update_bound=1.0)
    federation.approve_all(federation.submit(spec))
    conns = [_Recorder(c) for c in federation.connections(spec)]
    trainer = FederatedTrainer(spec, conns, secure_sum=federation.secure_sum(spec),
                               progress=False)
    trainer.fit()  # before: an overflow error, refunded, free to ask again
    for conn in conns:
        fits = [r for action, r in conn.replies if action == "fit"]
        assert len(fits) == 2 and all(r["clipped"] > 0 for r in fits)  # stated, not an error
    # a third round is not in the approved job's schedule: refused before anything runs
    with pytest.raises(SiteRefusedError, match="fit pass 3 is outside this job's 1..2"):
        conns[0].call("fit", {"round": 3, "previous": trainer.secure_sum.evidence()})
    assert [s.guard.approval(spec.job_id)["used"]["fit"] for s in federation.sites] == [2] * 3


def test_a_step_that_fails_on_private_data_is_counted_and_says_nothing(federation, schema,
                                                                        drive):
    """The step fails after the call was counted (here: evaluation of a job without a label
    column): the call stays spent and the reply is one fixed sentence."""
    spec = JobSpec(features=schema.features, label_column=None, rounds=1, evaluations=2)
    conns = [s.connection(spec) for s in federation.sessions()]
    federation.approve_all(federation.submit(spec))
    drive(conns, spec, 1)
    for _ in range(2):
        with pytest.raises(SiteRefusedError) as err:
            conns[0].call("evaluate", {})
        assert err.value.reason == STEP_FAILED
    with pytest.raises(SiteRefusedError, match="used all 2 approved 'evaluate' calls"):
        conns[0].call("evaluate", {})
    assert federation.sites[0].guard.approval(spec.job_id)["used"]["evaluate"] == 2


def test_the_label_can_never_be_a_feature(federation, schema):
    from pydantic import ValidationError

    from datasites.adapter import job_code

    with pytest.raises(ValidationError, match="cannot also be a feature"):
        JobSpec(features=(*schema.features, schema.label), label_column=schema.label)
    # a hand-made request that pins such a spec is not the template, so it cannot be approved
    spec = JobSpec(features=schema.features, label_column=schema.label)
    source = job_code.render("hospital-a", spec)
    tampered = source.replace('"features":["', f'"features":["{schema.label}","')
    assert tampered != source
    with pytest.raises(job_code.NotATemplateError, match="cannot also be a feature"):
        job_code.parse_request(tampered, "hospital-a")
