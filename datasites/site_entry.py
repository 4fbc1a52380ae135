"""The function every approved job code calls at the site.

The approved code is a few readable lines that pin the site, job and spec; this entry point
asks the site's guard for permission, runs the fed_tasks step on the private frames, and
returns one envelope string. Refusals and input errors come back as envelopes too, because
syft 0.9.5 replaces exceptions from user code with a generic message.
"""

from __future__ import annotations

import hashlib
import logging

import pandas as pd

from datasites.call_audit import audited_call
from datasites.federation_config import load_site_keys
from datasites.guard import CallRefused, guard_for
from datasites.protection import SECAGG_CONTROL, SecureSumCall, protect, secagg_control
from fed_tasks.codec import PayloadError, dumps, loads
from fed_tasks.spec import JobSpec
from privacy.fixed_point import FixedPointError

log = logging.getLogger(__name__)


@audited_call  # logs what leaves (result_released / call_refused) before it leaves
def run_approved(*, site: str, job_id: str, spec: str, train: pd.DataFrame, test: pd.DataFrame,
                 action: str, payload: str) -> str:
    """Authorize, run and wrap one call; never lets a private value into an error message."""
    try:
        job = JobSpec.from_json(spec)
        if job.job_id != job_id:
            raise CallRefused(f"code pins job {job_id!r} but its spec is job {job.job_id!r}")
        guard = guard_for(site)
        if guard.classify({"train": train, "test": test}) == "mock":
            # syft's twin execution: nothing private, nothing counted, nothing computed
            return dumps({"status": "mock"})
        # the dataset's policy and privacy budget: a call they forbid is refused uncounted
        guard.privacy.admit(job, action, len(train), guard.approval(job.job_id))
        call_no = guard.authorize(job, action)
        try:
            message = loads(payload)
            approval = guard.approval(job.job_id)
            if action in SECAGG_CONTROL:
                result = secagg_control(guard.directory, site, job, action, message)
            elif job.aggregation == "secagg" and action in ("stats", "fit"):
                call = SecureSumCall(guard.directory, job, action, message)
                step = guard.privacy.run_step(job, action, call.step_message(), train, test,
                                              approval)
                result = call.protect(step)
            else:
                # policy re-checked, DP budget charged before the step runs (site_privacy)
                step = guard.privacy.run_step(job, action, message, train, test, approval)
                result = protect(load_site_keys(guard.directory, site), job, action, step)
        except BaseException:
            guard.refund(job, action)  # nothing left the site: the call is not spent
            raise
        reply = dumps({"status": "ok", "action": action, "call": call_no, "result": result})
        log.info("site %s job %s %s #%d released %s", site, job_id, action, call_no,
                 hashlib.sha256(reply.encode()).hexdigest()[:16])
        return reply
    except CallRefused as exc:
        return dumps({"status": "refused", "reason": str(exc)})
    except FixedPointError as exc:
        # the message would quote a value derived from private data: name the bound only
        return dumps({"status": "error", "reason": f"{type(exc).__name__}: a contribution "
                      f"exceeds the job's encoding bound (update_bound={job.update_bound:g})"})
    except (PayloadError, ValueError, KeyError) as exc:
        # our own messages name columns and sizes, never cell values
        return dumps({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})
    except Exception as exc:  # noqa: BLE001 - the data scientist must not see internals
        log.exception("site %s job %s %s failed", site, job_id, action)
        reason = f"internal error at site ({type(exc).__name__})"
        return dumps({"status": "error", "reason": reason})
