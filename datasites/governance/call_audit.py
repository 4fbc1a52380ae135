"""Audit what an approved call lets out of the site, before it leaves.

Why a decorator: the entry points of approved code
(:func:`datasites.runtime.site_entry.run_approved`
and the key authority's) build one reply string that syft hands to the data scientist when
the function returns. Wrapping them means every reply, whatever branch produced it, is
logged *before* it becomes visible: ``result_released`` (sha256 and size of the exact
string) for results, ``call_refused`` / ``result_withheld`` for refusals and errors. If the
release cannot be logged, the result is withheld. ``function_executed`` is logged by the
guard when it authorizes the call (before the computation), using the round and payload
hash this wrapper puts in :data:`datasites.governance.guard.CALL_CONTEXT`.

Receipts: every released reply carries the site's signed audit head in a top-level
``audit_head`` field of the envelope (``result`` is untouched), so whoever holds the reply
can later prove what the log contained (:mod:`datasites.governance.receipts`). The head is read
after
the call ran, hence after its ``function_executed`` entry and before its ``result_released``
entry (which must hash the final string, head included): a receipt attests the log up to
and including this call's execution, not its own release.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from datasites.governance.audit import AuditError
from datasites.governance.guard import CALL_CONTEXT, CallRefused, guard_for
from fed_tasks.codec import PayloadError, dumps, loads

log = logging.getLogger(__name__)

WITHHELD = "the site could not record this release in its audit log; result withheld"


def _round_of(payload: Any) -> int | None:
    try:
        rnd = loads(payload).get("round")
    except (PayloadError, AttributeError):
        return None
    return rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None


def with_receipt(envelope: dict[str, Any], head: dict[str, Any]) -> str:
    """The reply string to release: the envelope plus the site's signed head."""
    return dumps({**envelope, "audit_head": head})


def audited_call(func: Callable[..., str]) -> Callable[..., str]:
    """Wrap an entry point ``func(*, site, job_id, action, payload, ...) -> envelope``."""

    @functools.wraps(func)
    def wrapper(*, site: str, job_id: str, action: str, payload: str, **kwargs: Any) -> str:
        raw = payload.encode("utf-8") if isinstance(payload, str) else b""
        ctx: dict[str, Any] = {"round": _round_of(payload), "call": None,
                               "payload_sha256": hashlib.sha256(raw).hexdigest(),
                               "payload_bytes": len(raw)}
        token = CALL_CONTEXT.set(ctx)
        try:
            reply = func(site=site, job_id=job_id, action=action, payload=payload, **kwargs)
        finally:
            CALL_CONTEXT.reset(token)
        return _audit_reply(site, str(job_id), str(action), reply, ctx)

    return wrapper


def _audit_reply(site: str, job_id: str, action: str, reply: str, ctx: dict[str, Any]) -> str:
    try:
        envelope = loads(reply)
    except PayloadError:
        return reply
    status = envelope.get("status")
    if status == "mock":  # syft's twin run on the mock: nothing private, nothing to log
        return reply
    try:
        guard = guard_for(site)
    except CallRefused:  # no site here: the reply is that refusal, and there is no log
        return reply
    if status == "ok":
        try:
            reply = with_receipt(envelope, guard.audit.head())
            guard.record_release(job_id, action, reply, ctx.get("call"), ctx.get("round"))
        except AuditError as exc:
            log.error("site %s: release of job %s %s not recorded: %s", site, job_id, action,
                      exc)
            guard.record_refusal(job_id, action, WITHHELD, after_run=True)
            return dumps({"status": "refused", "reason": WITHHELD})
        return reply
    guard.record_refusal(job_id, action, str(envelope.get("reason") or status),
                         after_run=ctx.get("call") is not None)
    return reply
