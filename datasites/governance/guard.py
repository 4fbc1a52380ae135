"""What a site enforces itself, because syft 0.9.5 does not (upstream issue 9391).

A data owner approves a job once; the guard remembers what was approved (the exact spec
and code hash) and how many calls of each kind remain, on disk in the site's directory so
it survives restarts. Every call of the approved code asks the guard first; the usage is
written *before* the call runs, so a crash never hands out a free round.

The guard also owns the site's tamper-evident audit log (``guard.audit``): each call it
authorizes is logged (``function_executed``) before it runs, and what leaves is logged by
:mod:`datasites.governance.call_audit` before it is handed out.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from datasites.governance.audit import Action, AuditError, AuditLog
from datasites.governance.audit import Role as AuditRole
from fed_tasks.schedule import phases, total_slots
from fed_tasks.spec import JobSpec

log = logging.getLogger(__name__)

# What the audited entry point knows about the call in progress (round, payload hash), so
# that ``authorize`` can log it; set by :func:`datasites.governance.call_audit.audited_call`.
CALL_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "fedsyft_call", default=None)


class CallRefused(PermissionError):
    """The site will not run this call; the message says why, for the data scientist."""


@dataclass(frozen=True)
class Approval:
    job_id: str
    spec_json: str
    code_hash: str
    approved_by: str
    limits: dict[str, int]


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """Content hash of a table (values, index and column names)."""
    h = hashlib.sha256(",".join(map(str, frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    return h.hexdigest()


def call_limits(spec: JobSpec) -> dict[str, int]:
    """How many calls of each action one approval allows (a model-selection job: every
    candidate's calls, one validation each, and the evaluations of the chosen one)."""
    if spec.model == "auto":
        limits: dict[str, int] = {}
        for sub in spec.candidate_specs:
            for action, n in call_limits(sub).items():
                if action != "evaluate":
                    limits[action] = limits.get(action, 0) + n
        return limits | {"validate": len(spec.candidate_models), "evaluate": spec.evaluations}
    limits = {p.action: p.count for p in phases(spec)} | {"evaluate": spec.evaluations}
    if spec.aggregation == "secagg":  # key setup once; a recovery per aggregate at most;
        # the last aggregate opened once (every other one is opened by the next call)
        limits |= {"secagg_advertise": 1, "secagg_share": 1,
                   "secagg_recover": total_slots(spec), "secagg_reveal": 1}
    return limits


class SiteGuard:
    """Per-site approvals and usage counters, persisted as JSON (atomic replace)."""

    def __init__(self, site: str, directory: str | Path, *, check_files: bool = True) -> None:
        """``check_files=False``: the data owner's repair (see
        :class:`datasites.governance.site_privacy.SitePrivacy`); otherwise a ledger or policy file
        that
        disagrees with the audit log raises ``SiteStateMismatch`` and nothing is written."""
        self.site = site
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self.directory / "approvals.json"
        self._lock = threading.Lock()
        self._state: dict[str, Any] = self._load()
        # one log per site directory; the owner's repair also signs a tail a crash left
        # unsigned (entries written, head not yet re-signed)
        self.audit = AuditLog(self.directory, site, recover_unsigned_tail=not check_files)
        from datasites.governance.site_privacy import (
            SitePrivacy,  # imports this module's CallRefused
        )

        try:
            self.privacy = SitePrivacy(self.directory, site, self.audit,  # policy, DP ledger
                                       check_files=check_files)
        except BaseException:
            self.audit.close()  # a refused site keeps no descriptor or lock of its log
            raise

    def _load(self) -> dict[str, Any]:
        if not self._path.exists():
            return {"jobs": {}}
        try:
            return json.loads(self._path.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"site {self.site!r}: approvals file {self._path} is corrupt: "
                               f"{exc}; refusing to run anything") from exc

    def _save(self) -> None:
        """Atomic replace; the file (it names jobs and requesters) is 0600 whatever the umask,
        and so is the temporary file it is renamed from (fchmod: a stale one keeps its mode)."""
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self._state, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)

    def record_approval(self, spec: JobSpec, code_hash: str, approved_by: str,
                        limits: dict[str, int] | None = None, *,
                        request: dict[str, str] | None = None) -> Approval:
        limits = limits or call_limits(spec)
        with self._lock:
            if spec.job_id in self._state["jobs"]:
                raise CallRefused(f"job {spec.job_id!r} was already approved at {self.site!r}")
            entry = {"spec": spec.to_json(), "code_hash": code_hash, "approved_by": approved_by,
                     "limits": dict(limits), "used": {k: 0 for k in limits},
                     "request": dict(request or {})}
            self._state["jobs"][spec.job_id] = entry
            self._save()
        return Approval(spec.job_id, entry["spec"], code_hash, approved_by, entry["limits"])

    def register_assets(self, private: dict[str, pd.DataFrame],
                        mock: dict[str, pd.DataFrame]) -> None:
        """Remember which tables are this site's private and mock assets.

        Syft runs approved code on the mock twin as well as on the private data; the guard
        must neither count nor compute those mock runs, and must refuse any other table.
        """
        with self._lock:
            self._state["assets"] = {
                "private": {k: frame_fingerprint(v) for k, v in private.items()},
                "mock": {k: frame_fingerprint(v) for k, v in mock.items()},
            }
            self._save()
        self.privacy.register_public_mock(mock)  # DP jobs scale features from the mock

    def classify(self, frames: dict[str, pd.DataFrame]) -> str:
        """``"private"`` or ``"mock"`` if ``frames`` are exactly those assets, else refuse."""
        assets = self._state.get("assets")
        if not assets:
            raise CallRefused(f"site {self.site!r} has no registered assets")
        prints = {k: frame_fingerprint(v) for k, v in frames.items()}
        for kind in ("private", "mock"):
            if all(assets[kind].get(k) == fp for k, fp in prints.items()):
                return kind
        raise CallRefused(f"the tables given are not the assets published at {self.site!r}")

    def approval(self, job_id: str) -> dict[str, Any] | None:
        job = self._state["jobs"].get(job_id)
        return json.loads(json.dumps(job)) if job else None

    def require_approved(self, spec: JobSpec, action: str) -> None:
        """Refuse at once (uncounted) a call of a job that is not approved as it runs, is
        revoked, or has no such action; :meth:`authorize` counts it later."""
        with self._lock:
            job = self._state["jobs"].get(spec.job_id)
            self._check_job(spec, job, action)

    def _check_job(self, spec: JobSpec, job: dict[str, Any] | None, action: str) -> None:
        if job is None:
            raise CallRefused(f"job {spec.job_id!r} was not approved through this site's "
                              f"review at {self.site!r}")
        if job["spec"] != spec.to_json():
            raise CallRefused(f"job {spec.job_id!r}: the running spec differs from the "
                              "approved one")
        if job.get("revoked"):
            raise CallRefused(f"job {spec.job_id!r} was revoked at {self.site!r} by its "
                              f"data owner: {job['revoked'].get('reason', '')}")
        if job["limits"].get(action) is None:
            raise CallRefused(f"action {action!r} is not part of job {spec.job_id!r}")

    def authorize(self, spec: JobSpec, action: str) -> int:
        """Consume one call of ``action`` for ``spec``'s job or raise :class:`CallRefused`.

        Returns the 1-based number of this call among the job's calls of that action.
        """
        with self._lock:
            job = self._state["jobs"].get(spec.job_id)
            self._check_job(spec, job, action)
            limit = job["limits"][action]
            used = job["used"][action]
            if used >= limit:
                raise CallRefused(f"job {spec.job_id!r} has used all {limit} approved "
                                  f"{action!r} calls at {self.site!r}")
            self._audit_execution(spec, job, action, used + 1)  # logged before it runs
            job["used"][action] = used + 1
            self._save()
            return used + 1


    # ---- revocation and the audit trail of calls ------------------------------------------
    def revoke(self, job_id: str, by: str, reason: str) -> None:
        """Refuse every further call of an approved job (the owner denied it after all)."""
        with self._lock:
            job = self._state["jobs"].get(job_id)
            if job is not None:
                job["revoked"] = {"by": by, "reason": reason}
                self._save()

    def reinstate(self, job_id: str) -> None:
        """Undo :meth:`revoke` (the owner approved the request again)."""
        with self._lock:
            job = self._state["jobs"].get(job_id)
            if job is not None and job.pop("revoked", None) is not None:
                self._save()

    def _requester(self, job: dict[str, Any] | None) -> tuple[str, str]:
        """The readable audit actor of a job's calls: ``requester_email`` (``requester`` is
        the stable syft id the policy checks; older records kept the e-mail there)."""
        request = (job or {}).get("request") or {}
        email = str(request.get("requester_email") or request.get("requester") or "")
        if "@" in email:
            return email, AuditRole.DATA_SCIENTIST
        return "unknown-caller", AuditRole.SYSTEM

    @staticmethod
    def _requester_id(job: dict[str, Any] | None) -> dict[str, str]:
        """``{"actor_id": verify key}`` of the job's requester, when the approval has it."""
        rid = str(((job or {}).get("request") or {}).get("requester") or "")
        return {"actor_id": rid} if rid and "@" not in rid else {}

    def _objects(self, job_id: str, job: dict[str, Any] | None) -> dict[str, str]:
        req = (job or {}).get("request") or {}
        return {"job_id": job_id, **{k: str(req[k]) for k in ("request_id", "code_id")
                                     if req.get(k)}}

    def _audit_execution(self, spec: JobSpec, job: dict[str, Any], action: str,
                         call_no: int) -> None:
        """``function_executed``, written before the call runs; no record, no run."""
        ctx = CALL_CONTEXT.get()
        params: dict[str, Any] = {**self._requester_id(job), "action": action, "call": call_no,
                                  "limit": job["limits"][action],
                                  "spec_fingerprint": spec.fingerprint}
        if ctx:
            params.update({k: ctx[k] for k in ("round", "payload_sha256", "payload_bytes")
                           if ctx.get(k) is not None})
        actor, role = self._requester(job)
        try:
            self.audit.append(actor, role, Action.FUNCTION_EXECUTED,
                              objects=self._objects(spec.job_id, job),
                              code_hash=job.get("code_hash") or None, params=params)
        except AuditError as exc:
            log.error("site %s: cannot audit job %s %s: %s", self.site, spec.job_id, action, exc)
            raise CallRefused(f"site {self.site!r} cannot record this call in its audit log; "
                              "refusing to run it") from None
        if ctx is not None:
            ctx["call"] = call_no

    def record_release(self, job_id: str, action: str, reply: str,
                       call_no: int | None = None, round_no: Any = None) -> dict[str, Any]:
        """``result_released`` for the exact reply string about to leave the site.

        Raises :class:`datasites.governance.audit.AuditError` if it cannot be recorded: the caller
        must
        then withhold the reply.
        """
        job = self.approval(job_id)
        owner = str((job or {}).get("approved_by") or "")
        actor, role = (owner, AuditRole.DATA_OWNER) if "@" in owner else ("fedsyft",
                                                                          AuditRole.SYSTEM)
        data = reply.encode("utf-8")
        params: dict[str, Any] = {**self._requester_id(job),
                                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                  "recipient": self._requester(job)[0], "action": action}
        if call_no is not None:
            params["call"] = call_no
        if round_no is not None:
            params["round"] = round_no
        objects = {**self._objects(job_id, job),
                   "result_id": f"{job_id}/{action}/{call_no if call_no is not None else '-'}"}
        return self.audit.append(actor, role, Action.RESULT_RELEASED, objects=objects,
                                 params=params)

    def record_refusal(self, job_id: str, action: str, reason: str, *,
                       after_run: bool = False) -> None:
        """``call_refused`` (or ``result_withheld`` once the call had run); best effort."""
        job = self.approval(job_id)
        actor, role = self._requester(job)
        what = Action.RESULT_WITHHELD if after_run else Action.CALL_REFUSED
        try:
            self.audit.append(actor, role, what, objects=self._objects(job_id, job),
                              params={**self._requester_id(job),
                                      "call": f"{action} (job {job_id})",
                                      "reason": reason[:2000]})
        except AuditError as exc:
            log.error("site %s: cannot audit a refused call: %s", self.site, exc)

    def close(self) -> None:
        self.audit.close()


_GUARDS: dict[str, SiteGuard] = {}
_GUARDS_LOCK = threading.Lock()


def register_guard(guard: SiteGuard) -> None:
    """Make ``guard`` the one the approved code of ``guard.site`` consults in this process."""
    with _GUARDS_LOCK:
        current = _GUARDS.get(guard.site)
        if current is not None and current is not guard:
            raise RuntimeError(f"another running site is already called {guard.site!r}")
        _GUARDS[guard.site] = guard


def is_registered(site: str) -> bool:
    with _GUARDS_LOCK:
        return site in _GUARDS


def guarded_directories() -> set[Path]:
    """The site directories whose guard runs in this process."""
    with _GUARDS_LOCK:
        return {g.directory.resolve() for g in _GUARDS.values()}


def unregister_guard(guard: SiteGuard) -> None:
    with _GUARDS_LOCK:
        if _GUARDS.get(guard.site) is guard:
            del _GUARDS[guard.site]


def guard_for(site: str) -> SiteGuard:
    """The guard of ``site``; for a datasite in another process, from ``FEDSYFT_SITES_DIR``."""
    with _GUARDS_LOCK:
        guard = _GUARDS.get(site)
        if guard is None and os.environ.get("FEDSYFT_SITES_DIR"):
            directory = Path(os.environ["FEDSYFT_SITES_DIR"]) / site
            if directory.is_dir():
                guard = _GUARDS[site] = SiteGuard(site, directory)
    if guard is None:
        raise CallRefused(f"site {site!r} has no fedsyft guard in this process: refusing to run")
    return guard
