"""What a site enforces itself, because syft 0.9.5 does not (upstream issue 9391).

A data owner approves a job once; the guard remembers what was approved (the exact spec
and code hash) and how many calls of each kind remain, on disk in the site's directory so
it survives restarts. Every call of the approved code asks the guard first; the usage is
written *before* the call runs, so a crash never hands out a free round.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fed_tasks.spec import JobSpec


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
    """How many calls of each action one approval allows."""
    return {"stats": 1, "fit": spec.rounds, "evaluate": spec.evaluations}


class SiteGuard:
    """Per-site approvals and usage counters, persisted as JSON (atomic replace)."""

    def __init__(self, site: str, directory: str | Path) -> None:
        self.site = site
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self.directory / "approvals.json"
        self._lock = threading.Lock()
        self._state: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        if not self._path.exists():
            return {"jobs": {}}
        try:
            return json.loads(self._path.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"site {self.site!r}: approvals file {self._path} is corrupt: "
                               f"{exc}; refusing to run anything") from exc

    def _save(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(self._state, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)

    def record_approval(self, spec: JobSpec, code_hash: str, approved_by: str) -> Approval:
        with self._lock:
            if spec.job_id in self._state["jobs"]:
                raise CallRefused(f"job {spec.job_id!r} was already approved at {self.site!r}")
            entry = {"spec": spec.to_json(), "code_hash": code_hash, "approved_by": approved_by,
                     "limits": call_limits(spec), "used": {k: 0 for k in call_limits(spec)}}
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

    def authorize(self, spec: JobSpec, action: str) -> int:
        """Consume one call of ``action`` for ``spec``'s job or raise :class:`CallRefused`.

        Returns the 1-based number of this call among the job's calls of that action.
        """
        with self._lock:
            job = self._state["jobs"].get(spec.job_id)
            if job is None:
                raise CallRefused(f"job {spec.job_id!r} was not approved through this site's "
                                  f"review at {self.site!r}")
            if job["spec"] != spec.to_json():
                raise CallRefused(f"job {spec.job_id!r}: the running spec differs from the "
                                  "approved one")
            limit = job["limits"].get(action)
            if limit is None:
                raise CallRefused(f"action {action!r} is not part of job {spec.job_id!r}")
            used = job["used"][action]
            if used >= limit:
                raise CallRefused(f"job {spec.job_id!r} has used all {limit} approved "
                                  f"{action!r} calls at {self.site!r}")
            job["used"][action] = used + 1
            self._save()
            return used + 1


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
