"""The compliance officer: a read-only view of one site's audit log and request records.

Why: an officer must answer, for any site and period, who asked for what code on which
data, who approved or denied it and why, what ran and what left the site. The officer is
deliberately *not* a syft user (any syft role could submit code or read mocks): the
credentials live in the site directory as a salted scrypt hash (``site_files``), and
:class:`AuditorSession` offers reading, verifying and exporting only: it holds no syft
client, no server and no data, so there is no approve, deny, submit or run path to misuse.

Reading never needs the site's signing key: the session reads and verifies through
:class:`datasites.governance.audit.AuditView` with the site's public key only. The entries the
officer's own actions cause (``audit_exported``, ``login_failed``) must be signed, so they
are written by the site service: through the running site's own writer when the site runs
in this process, else by a short-lived writer only where this process can read the signing
key (i.e. it runs as the site service, as in the single-user demo). Otherwise the action
goes ahead unrecorded and says so (:attr:`AuditorSession.not_recorded`).

No syft import here, so ``fedsyft audit ...`` starts in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from datasites.errors import AuthenticationError, RequestNotFoundError
from datasites.governance import audit_report
from datasites.governance.audit import (
    KEY_NAME,
    Action,
    AuditError,
    AuditLog,
    AuditView,
    Role,
    VerifyReport,
    snapshot,
)
from datasites.runtime.site_files import SiteInfo, check_officer, read_site_info

log = logging.getLogger(__name__)

_DECISION_WORDS = {Action.REQUEST_APPROVED: "approved", Action.REQUEST_DENIED: "denied"}


class SiteServiceUnavailable(AuditError):
    """Nothing here may sign the site's log: the site is not running in this process and its
    signing key is not readable by this process."""


@contextlib.contextmanager
def site_log(directory: Path, site: str) -> Iterator[AuditLog]:
    """The site's own log writer if the site runs in this process, else a short-lived one
    (the log is safe with several writers, across threads and processes), but only where
    this process can read the signing key: it never creates one, and raises
    `SiteServiceUnavailable` where the key is the site service's alone."""
    from datasites.governance.guard import guard_for, is_registered

    if is_registered(site):
        guard = guard_for(site)
        if guard.directory.resolve() == Path(directory).resolve():
            yield guard.audit
            return
    key = Path(directory) / KEY_NAME
    if not key.is_file() or not os.access(key, os.R_OK):
        raise SiteServiceUnavailable(
            f"site {site!r} is not running here and its signing key is not readable here")
    with AuditLog(directory, site) as audit:
        yield audit


def record_officer_action(directory: Path, site: str, actor: str, role: str, action: str,
                          params: dict[str, Any]) -> str:
    """Append an entry caused by an officer's action; "" if written, else why not.

    Best effort: the action itself (an export, a refused login) must not depend on it.
    ``params["entries"] = None`` is filled in with the number of entries before this one.
    """
    try:
        with site_log(directory, site) as audit:
            if "entries" in params and params["entries"] is None:
                params = {**params, "entries": audit.count}
            audit.append(actor, role, action, params=params)
    except (AuditError, OSError) as exc:
        log.warning("site %s: %s not recorded: %s", site, action, exc)
        return str(exc)
    return ""


def record_failed_login(directory: Path, site: str, email: str, role: str, via: str) -> str:
    """Append ``login_failed`` (best effort: a broken log must not hide the refusal itself);
    "" if written, else why not."""
    actor, actor_role = (email, role) if "@" in email and len(email) <= 254 else (
        "unknown", Role.SYSTEM)
    return record_officer_action(directory, site, actor.replace("\n", " "), actor_role,
                                 Action.LOGIN_FAILED,
                                 {"reason": "wrong email or password", "via": via})


@dataclass
class Decision:
    decision: str  # "approved" | "denied"
    by: str
    role: str
    at: str
    reason: str
    override: bool = False


@dataclass
class RequestRecord:
    """One request as the audit log and the site's approval ledger tell it."""

    request_id: str
    job_id: str = ""
    requester: str = ""
    submitted_at: str = ""
    code_hash: str = ""
    spec_fingerprint: str = ""
    template_ok: bool | None = None
    dataset: str = ""
    decisions: list[Decision] = field(default_factory=list)
    executed: dict[str, int] = field(default_factory=dict)  # action -> calls run
    released: int = 0
    released_bytes: int = 0
    refused: int = 0
    limits: dict[str, int] = field(default_factory=dict)  # from the site's ledger
    used: dict[str, int] = field(default_factory=dict)
    last_activity: str = ""

    @property
    def status(self) -> str:
        return self.decisions[-1].decision if self.decisions else "pending"

    def describe(self) -> str:
        """Who asked for what, who decided and why, what ran and left, in a few lines."""
        lines = [f"request {self.request_id} (job {self.job_id or '?'}): {self.status}",
                 f"  submitted {self.submitted_at} by {self.requester}; code sha256 "
                 f"{self.code_hash}; spec {self.spec_fingerprint}; data {self.dataset or '?'}"]
        for d in self.decisions:
            kind = "override: " if d.override else ""
            lines.append(f"  {kind}{d.decision} by {d.by} ({d.role}) at {d.at}: "
                         f"{d.reason or '(no reason given)'}")
        if self.executed or self.limits:
            calls = ", ".join(f"{a} {self.used.get(a, n)}/{self.limits.get(a, '?')}"
                              for a, n in sorted({**self.limits, **self.executed}.items()))
            lines.append(f"  calls used/approved: {calls}")
        lines.append(f"  released {self.released} result(s), {self.released_bytes} bytes; "
                     f"{self.refused} refused or withheld call(s)")
        return "\n".join(lines)


def _rid(entry: dict[str, Any]) -> str:
    objects = entry.get("objects") or {}
    return str(objects.get("request_id") or "")


def build_requests(entries: Iterable[dict[str, Any]], ledger: dict[str, Any] | None = None
                   ) -> list[RequestRecord]:
    """Fold audit entries (and the approval ledger, ``approvals.json``) into request records."""
    records: dict[str, RequestRecord] = {}
    by_job: dict[str, RequestRecord] = {}

    def record_for(entry: dict[str, Any]) -> RequestRecord | None:
        rid = _rid(entry)
        job = str((entry.get("objects") or {}).get("job_id") or "")
        if rid:
            rec = records.setdefault(rid, RequestRecord(rid))
            if job and not rec.job_id:
                rec.job_id = job
            if rec.job_id:
                by_job.setdefault(rec.job_id, rec)
            return rec
        return by_job.get(job) if job else None

    for e in entries:
        action, params = e.get("action"), e.get("params") or {}
        rec = record_for(e)
        if rec is None:
            continue
        rec.last_activity = str(e.get("time", ""))
        if action == Action.REQUEST_SUBMITTED:
            rec.requester, rec.submitted_at = str(e.get("actor")), str(e.get("time"))
            rec.code_hash = str(e.get("code_hash") or "")
            rec.spec_fingerprint = str(params.get("spec_fingerprint") or "")
            rec.template_ok = params.get("template_ok")
            rec.dataset = str((e.get("objects") or {}).get("dataset_id") or "")
        elif action in _DECISION_WORDS or action == Action.REQUEST_OVERRIDDEN:
            decision = _DECISION_WORDS.get(action) or str(params.get("decision", "?"))
            rec.decisions.append(Decision(decision, str(e.get("actor")), str(e.get("role")),
                                          str(e.get("time")), str(params.get("reason") or ""),
                                          action == Action.REQUEST_OVERRIDDEN))
        elif action == Action.FUNCTION_EXECUTED:
            what = str(params.get("action", "?"))
            rec.executed[what] = rec.executed.get(what, 0) + 1
        elif action == Action.RESULT_RELEASED:
            rec.released += 1
            rec.released_bytes += int(params.get("bytes") or 0)
        elif action in (Action.CALL_REFUSED, Action.RESULT_WITHHELD):
            rec.refused += 1
    for job_id, job in ((ledger or {}).get("jobs") or {}).items():
        rec = by_job.get(job_id) or records.get(str(job.get("request_id") or ""))
        if rec is not None:
            rec.limits = dict(job.get("limits") or {})
            rec.used = dict(job.get("used") or {})
    return sorted(records.values(), key=lambda r: (r.submitted_at or r.last_activity,
                                                    r.request_id))


#: besides the log, what an officer's copy holds: public facts and the approval ledger
#: (never a key, a password hash, the store or a table)
COPY_EXTRAS = ("site.json", "provisioned.json", "approvals.json")
COPY_NAMES = frozenset({"audit.jsonl", "audit.head.json", "audit_key.pub", *COPY_EXTRAS})


def write_copy(files: dict[str, str], directory: Path) -> Path:
    """Write an officer's copy (from :meth:`AuditorSession.copy`) owner-only into
    ``directory``; a name outside the copy's fixed set is refused (the copy comes from a
    server, and a name like ``../x`` must not write elsewhere)."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, text in files.items():
        if name not in COPY_NAMES or not isinstance(text, str):
            raise AuditError(f"the site sent an unexpected file {name!r} with its log")
        path = directory / name
        path.write_text(text)
        path.chmod(0o600)
    return directory


class AuditorSession:
    """A logged-in compliance officer of one site: read, verify and export; nothing else."""

    __slots__ = ("_directory", "_info", "_email", "_public_key", "_view", "_not_recorded")

    def __init__(self, info: SiteInfo, email: str, public_key: Any = None) -> None:
        self._directory = info.directory
        self._info = info
        self._email = email
        self._public_key = public_key
        self._view = AuditView(info.directory, public_key)  # public key only, read-only
        self._not_recorded = ""

    @classmethod
    def login(cls, directory: str | Path, email: str, password: str, *,
              public_key: Any = None) -> AuditorSession:
        """Check the officer's credentials; a wrong one is refused and logged."""
        info = read_site_info(directory)
        if not check_officer(info.directory, email, password):
            why = record_failed_login(info.directory, info.name, email,
                                      Role.COMPLIANCE_OFFICER, "compliance officer login")
            note = f" (this failed login was not recorded: {why})" if why else ""
            raise AuthenticationError(f"cannot log in to site {info.name!r} as compliance "
                                      f"officer {email!r}: wrong email or password{note}")
        return cls(info, email, public_key)

    @property
    def site(self) -> str:
        return self._info.name

    @property
    def email(self) -> str:
        return self._email

    @property
    def not_recorded(self) -> str:
        """Why the entry for this session's last export was not written ("" if it was)."""
        return self._not_recorded

    def verify(self) -> VerifyReport:
        """Check the whole hash chain and the signed head (pinned key if one was given)."""
        return self._view.verify()

    def entries(self, since: datetime | str | None = None, until: datetime | str | None = None,
                action: str | Iterable[str] | None = None, actor: str | None = None
                ) -> list[dict[str, Any]]:
        """Audit entries with ``since <= time < until`` (ISO-8601 with timezone)."""
        return self._view.entries(since=since, until=until, action=action, actor=actor)

    def requests(self, since: datetime | str | None = None,
                 until: datetime | str | None = None) -> list[RequestRecord]:
        """Requests with any recorded activity in the period, oldest first."""
        records = build_requests(self.entries(), self._ledger())
        if since is None and until is None:
            return records
        wanted = {_rid(e) for e in self.entries(since=since, until=until)} - {""}
        jobs = {str((e.get("objects") or {}).get("job_id") or "")
                for e in self.entries(since=since, until=until)} - {""}
        return [r for r in records if r.request_id in wanted or r.job_id in jobs]

    def request(self, request_id: str) -> RequestRecord:
        key = request_id.replace("-", "")
        matches = [r for r in self.requests() if key and r.request_id.startswith(key)]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise RequestNotFoundError(f"{what} request {request_id!r} in the audit log of "
                                       f"site {self.site!r}")
        return matches[0]

    def export(self, fmt: str, out: str | Path) -> Path:
        """Write the log as json, csv or html, then log the export where the site service
        can sign (see the module docstring), else `not_recorded` says why.

        Logged only after the file is written (``audit_exported`` with the number of entries
        before it, the file's sha256 and size): a write that fails raises ``OSError`` and
        leaves no entry claiming an export. The file therefore never holds its own entry.
        A broken log, or one nothing here can sign, is exported all the same: the export is
        read-only (public key) and the log, even a failed one, is evidence.
        """
        if fmt not in audit_report.FORMATS:
            raise audit_report.ExportFormatError(
                f"unknown audit export format {fmt!r}; use one of {sorted(audit_report.FORMATS)}")
        self._not_recorded = ""
        path = audit_report.export(self._directory, fmt, out, public_key=self._public_key)
        data = path.read_bytes()
        self._not_recorded = record_officer_action(
            self._directory, self.site, self._email, Role.COMPLIANCE_OFFICER,
            Action.AUDIT_EXPORTED, {"format": fmt, "entries": None, "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()})
        return path

    def copy(self, purpose: str) -> dict[str, str]:
        """The log, its head and public key, the site's public facts and its approval ledger,
        for the officer to verify and read on her own machine (``audit ... --config``).
        What leaves is logged after it is read (``audit_exported``, format ``copy``), so
        the copy never holds its own entry, as with a file export."""
        files = {name: data.decode() for name, data in snapshot(self._directory).items()}
        for name in COPY_EXTRAS:
            path = self._directory / name
            if path.is_file():
                files[name] = path.read_text()
        data = json.dumps(files, sort_keys=True).encode()
        self._not_recorded = record_officer_action(
            self._directory, self.site, self._email, Role.COMPLIANCE_OFFICER,
            Action.AUDIT_EXPORTED, {"format": "copy", "purpose": purpose, "entries": None,
                                    "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()})
        return files

    def _ledger(self) -> dict[str, Any]:
        try:
            return json.loads((self._directory / "approvals.json").read_text())
        except (OSError, ValueError):
            return {}
