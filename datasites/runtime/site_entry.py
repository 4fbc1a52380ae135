"""The function every approved job code calls at the site.

The approved code is a few readable lines that pin the site, job and spec; this entry point
asks the site's guard for permission, runs the fed_tasks step on the private frames, and
returns one envelope string. Refusals and input errors come back as envelopes too, because
syft 0.9.5 replaces exceptions from user code with a generic message.

Order matters, because the data scientist controls the message:

1. everything that needs no private value is checked first — the message's schema, the
   round order, the evidence of the previous aggregate, the site's keys — and a failure
   there is refused *uncounted*, with a message that may name the problem;
2. then the call is counted (and, under DP, charged) and the private step runs. From here
   on nothing is refunded, and a failure gets one fixed message: whether a call on private
   data succeeds, and how it fails, can depend on the data, so neither may be a free query.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from datasites.governance.call_audit import audited_call
from datasites.governance.guard import CallRefused, SiteGuard, guard_for
from datasites.governance.receipts import keep_peer_receipts
from datasites.runtime.aggregate_check import authority_sum, plain_sum
from datasites.runtime.federation_config import SiteKeys, load_site_keys, read_config
from datasites.runtime.protection import SECAGG_CONTROL, SecureSumCall, protect, secagg_control
from fed_tasks.buffered import staleness_weight
from fed_tasks.codec import PayloadError, decode_array, dumps, encode_array, loads
from fed_tasks.messages import AggregateEvidence, parse_message
from fed_tasks.schedule import SUMMED_ACTIONS, vector_length
from fed_tasks.selection import candidate_job, validation_split
from fed_tasks.site_state import ModelStateError, SiteModelState, aggregate_index
from fed_tasks.site_step import StepInput, initial_weights
from fed_tasks.spec import JobSpec
from privacy.secagg import SecAggError

log = logging.getLogger(__name__)

#: what the data scientist reads when a step failed on private data (see the module doc)
STEP_FAILED = "the site step failed on the private data; the call is counted"


@contextlib.contextmanager
def job_lock(directory: str | Path, job_id: str) -> Iterator[None]:
    """Hold this site's lock of one job from loading its state to saving it.

    Two concurrent calls would otherwise both load the same model state and both compute
    (and release, and be charged for) the same slot. ``flock`` on a file of the site
    directory serialises threads and processes alike (each open is its own lock holder)."""
    fd = os.open(Path(directory) / f"job_{job_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _model_path(directory: Path, spec: JobSpec) -> Path:
    return Path(directory) / f"model_{spec.job_id}.json"


class _ModelCall:
    """A model call (a summed phase, evaluate, the last secure-sum opening) prepared from what
    the site holds and verifies, before anything private is touched."""

    def __init__(self, guard: SiteGuard, site: str, spec: JobSpec, action: str,
                 message: dict[str, Any]) -> None:
        self.spec, self.action, self.site, self.guard = spec, action, site, guard
        self.directory = Path(guard.directory)
        self.msg = parse_message(action, message)
        self.keys: SiteKeys | None = load_site_keys(guard.directory, site)
        if self.keys is None:
            raise CallRefused(f"site {site!r} has no federation configuration (member keys)")
        self.state = SiteModelState.load(spec, initial_weights(spec),
                                         _model_path(guard.directory, spec))
        self.secure = (SecureSumCall(guard.directory, self.keys, spec)
                       if spec.aggregation == "secagg" else None)
        self.cached: dict[str, Any] | None = None
        self.late: dict[str, Any] | None = None  # a buffered secure sum's late update
        self.round = int(getattr(self.msg, "round", 0))
        self.slot: int | None = None
        if action in SUMMED_ACTIONS:  # the slot follows from the approved spec's schedule
            self.slot = aggregate_index(spec, action, self.round)
            if self.slot == self.state.trained and self.state.reply is not None:
                self.cached = self.state.reply  # an exact retry: the same reply, nothing new
                return
        missed = list(getattr(self.msg, "catch_up", []) or [])
        if missed and self.secure is not None and spec.async_k is None:
            raise CallRefused("a secure-sum job relays no missed aggregates: a site left out "
                              "of a round stays out of the session")
        previous = getattr(self.msg, "previous", None)
        for evidence in [*missed, *([previous] if previous is not None else [])]:
            self._advance(evidence)
        if self.slot is not None:
            self.state.check_slot(self.slot)
        if (self.secure is not None and action in SUMMED_ACTIONS  # its shares inbox and
                and self.secure.client.phase != "keys"):  # whom it would mask with:
            try:  # refused before anything private runs
                if self.secure.client.phase == "shared":
                    self.secure.client.open_inbox(getattr(self.msg, "inbox", None))
                self.secure.client.peers_for(getattr(self.msg, "roster", None))
            except SecAggError as exc:
                raise CallRefused(f"this round's masking is refused: {exc}") from None
        # a buffered secure-sum round: an update of this site that no aggregate holds yet
        # is masked again for this round instead of training a new one
        self.late = (self._late_update() if self.secure is not None and action == "fit"
                     and spec.async_k is not None else None)

    def _advance(self, evidence: AggregateEvidence) -> None:
        """Apply the previous aggregate once the site has verified it itself."""
        if evidence.kind != self.spec.aggregation:
            raise CallRefused(f"job {self.spec.job_id!r} aggregates by {self.spec.aggregation!r},"
                              f" not {evidence.kind!r}")
        index = aggregate_index(self.spec, evidence.action, evidence.round)
        if index <= self.state.applied:
            return  # already part of this site's model: nothing to learn from it again
        if not self.state.expects(index):
            raise ModelStateError(f"aggregate {index} is not the next one for this site "
                                  f"(it holds the model after aggregate {self.state.applied})")
        if self.secure is not None:
            summed = self.secure.open_previous(evidence, self.state)
        elif evidence.kind == "plain":
            summed = plain_sum(self.directory, self.site, self.spec, evidence, self.state)
        else:
            summed = authority_sum(self.directory, self.site, self.spec, evidence, self.state)
        self.state.apply(evidence.action, evidence.round, summed)
        if self.secure is not None:  # opened: its survivors are final, whatever comes next
            self.secure.save()
        self.state.save()
        config = read_config(self.directory) or {}
        keep_peer_receipts(self.directory, self.site, config.get("audit_keys") or {},
                           evidence.heads, job_id=self.spec.job_id,
                           action=f"{evidence.action} {evidence.round}")

    def _late_update(self) -> dict[str, Any] | None:
        """This site's last update if it came too late for its round and may still join
        this one (no aggregate holds it, at most ``max_staleness`` rounds old, its model
        still known); else None, and the pending update is forgotten."""
        pending, self.state.pending = self.state.pending, None
        if pending is None or self.slot is None:
            return None
        slot = int(pending["slot"])
        model = self.state.model_before(slot)
        if (slot <= self.state.used.get(self.site, 0) or slot >= self.slot
                or self.slot - slot > self.spec.max_staleness or model is None):
            return None
        self.state.pending = pending
        return {**pending, "model": model}  # the model it was computed from, to sign

    def late_step(self) -> dict[str, Any]:
        """The step of a round this site joins with its late update: that update, weighed
        by its staleness (the weight a secure sum cannot apply; the site can, knowing both
        slots), nothing private computed anew."""
        assert self.late is not None and self.slot is not None
        vector = decode_array(str(self.late["vector"]), vector_length(self.spec, "fit"))
        weight = staleness_weight(self.slot - int(self.late["slot"]))
        return {"vector": weight * vector, "round": self.round}

    def step_input(self) -> StepInput:
        return StepInput(self.round, self.state.state, self.state.private)

    def release(self, step: dict[str, Any]) -> dict[str, Any]:
        """Protect what the step returns and remember it (a retry gets the same bytes)."""
        model = self.state.digest
        if self.action == "evaluate":
            return step
        assert self.keys is not None
        if self.secure is not None:
            inbox = getattr(self.msg, "inbox", None)
            roster = getattr(self.msg, "roster", None)
            computed_for = None
            if self.late is not None:  # signed with the slot and model it was computed for
                computed_for, model = int(self.late["slot"]), str(self.late["model"])
            elif self.action == "fit" and self.spec.async_k is not None:
                self.state.pending = {"slot": self.slot, "vector": encode_array(step["vector"])}
            result = self.secure.protect(self.action, step, inbox, model, roster, computed_for)
        else:
            result = protect(self.keys, self.spec, self.action, step, model)
        # relayed with the aggregate, so the other members keep it as a receipt
        result["audit_head"] = self.guard.audit.head()
        assert self.slot is not None
        self.state.record_trained(self.slot, result)
        self.state.save()
        return result

    def reveal(self) -> dict[str, Any]:
        """The last secure sum: opened by the site, which also moves its model to it."""
        if self.secure is None or self.secure.opened is None:
            raise ModelStateError("there is no unopened secure sum left to reveal")
        return {"opened": self.secure.opened.to_str()}


@audited_call  # logs what leaves (result_released / call_refused) before it leaves
def run_approved(*, site: str, job_id: str, spec: str, train: pd.DataFrame, test: pd.DataFrame,
                 action: str, payload: str) -> str:
    """Authorize, run and wrap one call; never lets a private value into an error message."""
    counted = False
    try:
        job = JobSpec.from_json(spec)
        if job.job_id != job_id:
            raise CallRefused(f"code pins job {job_id!r} but its spec is job {job.job_id!r}")
        guard = guard_for(site)
        if guard.classify({"train": train, "test": test}) == "mock":
            # syft's twin execution: nothing private, nothing counted, nothing computed
            return dumps({"status": "mock"})
        guard.require_approved(job, action)  # approved, not revoked: before anything else
        missing = [c for c in job.features if c not in train.columns]  # the public schema
        if missing:
            raise CallRefused(f"job {job.job_id!r} names columns {missing} that are not in "
                              f"the published schema of site {site!r}")
        approval = guard.approval(job.job_id)
        # the dataset's policy and privacy budget: a call they forbid is refused uncounted
        guard.privacy.admit(job, action, len(train), approval)
        message = loads(payload)
        # a model-selection job: the named candidate's spec, derived here from the approved
        # one, trained on the rows left after the validation split (the same for every call)
        model_job = candidate_job(job, message.pop("candidate", None)
                                  if isinstance(message, dict) else None)
        step_action = action
        if model_job is not job:
            train, held_out = validation_split(job, train)
            if action == "validate":  # the candidate's evaluation, on the held-out rows
                test, step_action = held_out, "evaluate"
        with job_lock(guard.directory, model_job.job_id):  # one call of a job at a time
            if action in SECAGG_CONTROL:
                keys = load_site_keys(guard.directory, site)
                if keys is None:
                    raise CallRefused(f"site {site!r} has no federation configuration")
                call_no = guard.authorize(job, action)
                result = secagg_control(guard.directory, keys, model_job, action, message)
            else:
                call = _ModelCall(guard, site, model_job, step_action, message)
                if call.cached is not None:
                    return dumps({"status": "ok", "action": action, "call": None,
                                  "retry": True, "result": call.cached})
                call_no = guard.authorize(job, action)
                if action == "secagg_reveal":
                    result = call.reveal()
                else:
                    counted = True
                    # policy re-checked, DP budget charged before the step runs (site_privacy)
                    step = (call.late_step() if call.late is not None else
                            guard.privacy.run_step(model_job, step_action, call.step_input(),
                                                   train, test, approval))
                    result = call.release(step)
        reply = dumps({"status": "ok", "action": action, "call": call_no, "result": result})
        log.info("site %s job %s %s #%d released %s", site, job_id, action, call_no,
                 hashlib.sha256(reply.encode()).hexdigest()[:16])
        return reply
    except CallRefused as exc:
        return dumps({"status": "refused", "reason": str(exc)})
    except Exception as exc:  # noqa: BLE001 - the data scientist must not see internals
        if counted:
            log.exception("site %s job %s %s failed on private data", site, job_id, action)
            return dumps({"status": "error", "reason": STEP_FAILED})
        if isinstance(exc, PayloadError | ValueError | KeyError | PermissionError):
            # before the private step: about the message or the site's setup, not the data
            return dumps({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})
        log.exception("site %s job %s %s failed", site, job_id, action)
        return dumps({"status": "error", "reason": f"internal error at site "
                                                   f"({type(exc).__name__})"})
