"""fedsyft's own HTTP routes on a hosted datasite, beside syft's ``/api/v2``.

- ``GET /fedsyft/v1/health``: who answers (site name, kind, pid) and the state of its audit
  chain; what ``fedsyft up`` waits for and ``fedsyft status`` prints. No login, no secret.
- ``POST /fedsyft/v1/owner``: one data-owner action (list, show, approve, deny, policy,
  budget) with the owner's e-mail and password in the body, checked against syft's own
  accounts in this process, so the guard, ledger, review and audit log that decide are the
  server's; a wrong password is logged as ``login_failed``.

- ``POST /fedsyft/v1/officer``: a copy of the audit log (with its head, public key, the
  site's public facts and approval ledger) for a compliance officer, whose password is
  checked against the site's officer record; the officer verifies and reads the copy on her
  own machine (pin the site's key with ``--public-key`` or check ``--receipts``: a copy is
  only as good as the key it is checked with). The copy is logged as ``audit_exported``.

Errors come back as ``{"ok": false, "error": one line}``: the client prints that line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from datasites.errors import AuthenticationError, RequestNotFoundError
from datasites.governance.audit import verify

log = logging.getLogger(__name__)


class OfficerCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=254)
    password: str = Field(max_length=1024, repr=False)
    purpose: Literal["verify", "requests", "export"]


class OwnerCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=254)
    password: str = Field(max_length=1024, repr=False)
    op: str
    args: dict[str, Any] = {}


def _requests(site: Any, args: dict[str, Any]) -> Any:
    return [asdict(r) for r in site.requests()]


def _show(site: Any, args: dict[str, Any]) -> Any:
    review = site.review(str(args["request_id"]))
    return {"words": review.plain_words(), "code": review.code}


def _approve(site: Any, args: dict[str, Any]) -> Any:
    review = site.approve(str(args["request_id"]), reason=str(args.get("reason", "")),
                          override_reason=args.get("override_reason"))
    return {"words": review.plain_words(), "by": site.operator.email}


def _deny(site: Any, args: dict[str, Any]) -> Any:
    site.deny(str(args["request_id"]), str(args.get("reason", "")))
    return {"by": site.operator.email}


def _policy(site: Any, args: dict[str, Any]) -> Any:
    return site.policy().model_dump(mode="json")


def _set_policy(site: Any, args: dict[str, Any]) -> Any:
    changes = dict(args.get("changes") or {})
    return site.set_policy(reason=str(args.get("reason", "")), **changes).model_dump(mode="json")


def _budget(site: Any, args: dict[str, Any]) -> Any:
    return site.privacy_spent()


OWNER_OPS = {"requests": _requests, "show": _show, "approve": _approve, "deny": _deny,
             "policy": _policy, "set_policy": _set_policy, "budget": _budget}
#: ops a key authority answers (it has no dataset policy or budget)
AUTHORITY_OPS = frozenset({"requests", "show", "approve", "deny"})


def health(site: Any, url: str) -> dict[str, Any]:
    report = verify(site.directory)
    pending = None
    try:
        pending = sum(1 for r in site.server.services.request.stash.get_all(
            site.server.verify_key).unwrap() if str(r.status.name).lower() == "pending")
    except Exception:  # noqa: BLE001 - status is best effort
        pass
    return {"site": site.name, "kind": "site" if site.holds_data else "authority",
            "pid": os.getpid(), "url": url, "pending_requests": pending,
            "datasets": 1, "audit": {"ok": report.ok, "entries": report.entries,
                                     "problem": report.problem}}


def router(site: Any, url: str) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    def get_health() -> dict[str, Any]:
        return health(site, url)

    @api.post("/officer")
    def post_officer(call: OfficerCall) -> dict[str, Any]:
        from datasites.governance.compliance import AuditorSession

        try:
            session = AuditorSession.login(site.directory, call.email, call.password)
            return {"ok": True, "result": {"files": session.copy(call.purpose)}}
        except (AuthenticationError, OSError, ValueError) as exc:
            return {"ok": False, "error": str(exc).splitlines()[0] if str(exc) else
                    type(exc).__name__}

    @api.post("/owner")
    def post_owner(call: OwnerCall) -> dict[str, Any]:
        ops = OWNER_OPS if site.holds_data else {k: OWNER_OPS[k] for k in AUTHORITY_OPS}
        if call.op not in ops:
            return {"ok": False, "error": f"site {site.name!r} has no owner action "
                                          f"{call.op!r} (it offers: {', '.join(ops)})"}
        try:
            with site.acting_as(call.email, call.password, call.op) as acting:
                return {"ok": True, "result": ops[call.op](acting, call.args)}
        except (AuthenticationError, PermissionError, RequestNotFoundError, LookupError,
                ValueError, RuntimeError) as exc:
            return {"ok": False, "error": str(exc).splitlines()[0] if str(exc) else
                    type(exc).__name__}
        except Exception as exc:  # noqa: BLE001 - logged here, one line there
            log.exception("site %s: owner action %s failed", site.name, call.op)
            return {"ok": False, "error": f"internal error at site {site.name!r} "
                                          f"({type(exc).__name__}); see its server.log"}

    return api
