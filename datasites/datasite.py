"""One institution's datasite, as its data owner runs it: provision, publish, review, approve."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from datasites import job_code
from datasites.accounts import Account, Role, new_password
from datasites.audit import Action, AuditError
from datasites.audit import Role as AuditRole
from datasites.errors import AuthenticationError, ProvisioningError, RequestNotFoundError
from datasites.guard import (
    SiteGuard,
    frame_fingerprint,
    is_registered,
    register_guard,
    unregister_guard,
)
from datasites.policy import DATASET_NAME as POLICY_DATASET
from datasites.policy import DatasetPolicy, PolicyError
from datasites.quiet import quiet
from datasites.review import Review
from datasites.site_files import (
    SiteBusyError,
    SiteLock,
    read_site_info,
    store_officer,
    write_site_info,
)
from datasites.syft_server import ServiceRole, login, start_server, sy, syft_message
from datasites.tables import FederationSchema, make_mock, validate

DATASET_NAME = POLICY_DATASET  # the one dataset a site publishes (see datasites.policy)
_SYFT_ROLES = {Role.DATA_OWNER: ServiceRole.DATA_OWNER,
               Role.DATA_SCIENTIST: ServiceRole.DATA_SCIENTIST}
_AUDIT_ROLES = {Role.ADMIN: AuditRole.SYSTEM, Role.DATA_OWNER: AuditRole.DATA_OWNER,
                Role.DATA_SCIENTIST: AuditRole.DATA_SCIENTIST,
                Role.COMPLIANCE_OFFICER: AuditRole.COMPLIANCE_OFFICER}
SYSTEM_ACTOR = "fedsyft"  # the site software itself, in audit entries
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestSummary:
    request_id: str
    requester: str
    status: str
    function: str
    job_id: str = ""


class Datasite:
    """A running PySyft datasite plus the site-side state fedsyft keeps beside it."""

    holds_data = True  # a data site: its dataset policy and privacy budget apply

    def __init__(self, name: str, directory: Path, server: Any, accounts: dict[Role, Account],
                 guard: SiteGuard, operator: Account | None = None,
                 lock: SiteLock | None = None) -> None:
        self.name = name
        self.directory = directory
        self.server = server
        self.accounts = accounts
        self.guard = guard
        self.operator = operator or accounts[Role.DATA_OWNER]  # who acts through this object
        self._lock = lock
        self._owner_client: Any = None
        self._seen: set[str] | None = None  # request ids already in the audit log

    # ---- provisioning -------------------------------------------------------------------
    @classmethod
    def provision(cls, name: str, directory: str | Path, *, train: pd.DataFrame,
                  test: pd.DataFrame, schema: FederationSchema, scientist: Account,
                  owner_email: str | None = None, mock_rows: int = 500,
                  seed: int = 0, owner_password: str | None = None,
                  officer_email: str | None = None,
                  officer_password: str | None = None) -> Datasite:
        """Start a datasite with fresh credentials, accounts and a published dataset.

        Tables are validated first; if anything fails afterwards the server is stopped and
        its directory removed, so no half-provisioned site is left behind.
        """
        validate(train, schema, where=f"site {name!r} train split", min_rows=2)
        validate(test, schema, where=f"site {name!r} test split", min_rows=1)
        private = {"train": train.reset_index(drop=True), "test": test.reset_index(drop=True)}
        mocks = {k: make_mock(v, schema, mock_rows, seed + i)
                 for i, (k, v) in enumerate(private.items())}
        description = (f"Private table of {name}: {schema.describe()}. "
                       f"Mocks are synthetic (independent normals per column), no real row.")
        return cls._provision(name, directory, scientist, owner_email, private, mocks,
                              description, owner_password=owner_password,
                              officer_email=officer_email, officer_password=officer_password)

    @classmethod
    def _provision(cls, name: str, directory: str | Path, scientist: Account,
                   owner_email: str | None, private: dict[str, pd.DataFrame],
                   mocks: dict[str, pd.DataFrame], description: str, *,
                   owner_password: str | None = None, officer_email: str | None = None,
                   officer_password: str | None = None) -> Datasite:
        if is_registered(name):
            raise ProvisioningError(f"a site called {name!r} is already running in this process")
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise ProvisioningError(f"site directory {directory} is not empty")
        accounts = {
            Role.ADMIN: Account(f"root@{name}.site", Role.ADMIN, new_password(), "Site admin"),
            Role.DATA_OWNER: Account(owner_email or f"owner@{name}.site", Role.DATA_OWNER,
                                     owner_password or new_password(), "Data owner"),
            Role.DATA_SCIENTIST: scientist,
            Role.COMPLIANCE_OFFICER: Account(officer_email or f"officer@{name}.site",
                                             Role.COMPLIANCE_OFFICER,
                                             officer_password or new_password(),
                                             "Compliance officer"),
        }
        server = guard = lock = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = SiteLock(directory, name)
            guard = SiteGuard(name, directory)  # starts the audit log (and its signing key)
            write_site_info(directory, name, {r.value: a.email for r, a in accounts.items()},
                            str(sy.__version__))
            root = accounts[Role.ADMIN]
            guard.audit.append(SYSTEM_ACTOR, AuditRole.SYSTEM, Action.SITE_PROVISIONED,
                               objects={"site": name},
                               params={"syft_version": str(sy.__version__),
                                       "kind": cls.__name__, "dataset": DATASET_NAME})
            _audit_user(guard, root, accounts[Role.ADMIN], "syft")
            server = start_server(name, directory, root.email, root.password, reset=True)
            root_client = login(server, root.email, root.password, name)
            for role in (Role.DATA_OWNER, Role.DATA_SCIENTIST):
                acct = accounts[role]
                _audit_user(guard, root, acct, "syft")
                with quiet():
                    res = root_client.users.create(
                        email=acct.email, name=acct.name or role.value, password=acct.password,
                        password_verify=acct.password, role=_SYFT_ROLES[role])
                if isinstance(res, sy.SyftError):
                    raise ProvisioningError(f"creating {role.value} account: {syft_message(res)}")
            officer = accounts[Role.COMPLIANCE_OFFICER]
            _audit_user(guard, root, officer, "fedsyft (read-only, not a syft user)")
            store_officer(directory, officer.email, officer.password)
            site = cls(name, directory, server, accounts, guard, lock=lock)
            site._publish(private, mocks, description)
            register_guard(site.guard)
            return site
        except Exception as exc:
            if server is not None:
                with quiet():
                    server.stop()
            if guard is not None:
                guard.close()
            if lock is not None:
                lock.release()
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, ProvisioningError):
                raise
            raise ProvisioningError(f"site {name!r} could not be provisioned: {exc}") from exc

    def _publish(self, private: dict[str, pd.DataFrame], mocks: dict[str, pd.DataFrame],
                 description: str) -> None:
        assets_facts = {k: {"rows": len(v), "columns": [str(c) for c in v.columns],
                            "sha256": frame_fingerprint(v), "mock_rows": len(mocks[k]),
                            "mock_sha256": frame_fingerprint(mocks[k])}
                        for k, v in private.items()}
        self.guard.audit.append(self.operator.email, AuditRole.DATA_OWNER,
                                Action.DATASET_PUBLISHED, objects={"dataset_id": DATASET_NAME},
                                params={"name": DATASET_NAME, "assets": assets_facts,
                                        "rows": sum(len(v) for v in private.values())})
        self.guard.register_assets(private, mocks)
        self.guard.privacy.policies.set_base_description(description)
        if self.holds_data:  # the scientist reads the owner's policy with the dataset
            description = self.guard.privacy.describe()
        assets = [sy.Asset(name=k, data=private[k], mock=mocks[k]) for k in private]
        with quiet():
            res = self.owner_client().upload_dataset(
                sy.Dataset(name=DATASET_NAME, description=description, asset_list=assets))
        if isinstance(res, sy.SyftError):
            raise ProvisioningError(f"uploading dataset: {syft_message(res)}")

    def owner_client(self) -> Any:
        """The syft client of :attr:`operator` (the data owner, unless reopened otherwise)."""
        if self._owner_client is None:
            self._owner_client = self.login(self.operator.email, self.operator.password)
        return self._owner_client

    def login(self, email: str, password: str) -> Any:
        """A syft client of this site; wrong credentials are refused and logged."""
        try:
            return login(self.server, email, password, self.name)
        except AuthenticationError:
            self._audit_failed_login(email, "syft login")
            raise

    def close(self) -> None:
        unregister_guard(self.guard)
        with quiet():
            self.server.stop()
        self.guard.close()
        if self._lock is not None:
            self._lock.release()

    # ---- restart --------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, email: str, password: str) -> Datasite:
        """Reopen a provisioned site from its directory (after a restart), as ``email``.

        The syft store, server key and uid, the guard's ledger and the audit chain are all
        in the directory; the audit chain is verified before anything starts. Only the
        site's data owner (who may approve) or admin (who may only read) can open it.
        """
        info = read_site_info(directory)
        if is_registered(info.name):
            raise SiteBusyError(f"a site called {info.name!r} is already running in this "
                                "process")
        lock = SiteLock(info.directory, info.name)
        guard = server = None
        try:
            guard = SiteGuard(info.name, info.directory)  # AuditLogCorrupt if tampered with
            root_email = info.email(Role.ADMIN.value)
            server = start_server(info.name, info.directory, root_email, new_password(),
                                  reset=False)
            accounts = {Role(r): Account(e, Role(r), "", "") for r, e in info.accounts.items()
                        if r in Role.__members__.values()}
            site = cls(info.name, info.directory, server, accounts, guard,
                       operator=Account(email, Role.DATA_OWNER, password), lock=lock)
            client = site.login(email, password)
            with quiet():
                syft_role = client.account.role
            role = {ServiceRole.DATA_OWNER: Role.DATA_OWNER,
                    ServiceRole.ADMIN: Role.ADMIN}.get(syft_role)
            if role is None:
                site._refuse("open the site", f"{email!r} is not a data owner or admin of "
                             f"site {info.name!r}", actor=Account(email, Role.DATA_SCIENTIST, ""))
            site.operator = Account(email, role, password)
            site._owner_client = client
            register_guard(guard)
            return site
        except BaseException:
            if server is not None:
                with quiet():
                    server.stop()
            if guard is not None:
                guard.close()
            lock.release()
            raise

    # ---- audit helpers ----------------------------------------------------------------------
    def _audit_failed_login(self, email: str, via: str) -> None:
        known = next((a for a in self.accounts.values() if a.email == email), None)
        role = _AUDIT_ROLES[known.role] if known else AuditRole.DATA_SCIENTIST
        actor = email if "@" in email and len(email) <= 254 else "unknown"
        try:
            self.guard.audit.append(actor, role if actor != "unknown" else AuditRole.SYSTEM,
                                    Action.LOGIN_FAILED,
                                    params={"reason": "wrong email or password", "via": via,
                                            "known_account": known is not None})
        except AuditError as exc:
            log.error("site %s: failed login not recorded: %s", self.name, exc)

    def _refuse(self, what: str, reason: str, actor: Account | None = None) -> None:
        """Log a refused owner-side action (``call_refused``), then raise PermissionError."""
        who = actor or self.operator
        try:
            self.guard.audit.append(who.email, _AUDIT_ROLES[who.role], Action.CALL_REFUSED,
                                    params={"call": what, "reason": reason})
        except AuditError as exc:
            log.error("site %s: refusal not recorded: %s", self.name, exc)
        raise PermissionError(f"site {self.name!r} refuses to {what}: {reason}")

    def _require_owner(self, what: str) -> None:
        if self.operator.role != Role.DATA_OWNER:
            self._refuse(what, f"{self.operator.email} is {self.operator.role.value}, only the "
                               "site's data owner may decide on requests")

    def _observe(self, reqs: list[Any]) -> None:
        """``request_submitted`` for each request the site has not logged yet."""
        if self._seen is None:
            self._seen = {str((e.get("objects") or {}).get("request_id"))
                          for e in self.guard.audit.entries(action=Action.REQUEST_SUBMITTED)}
        for req in reqs:
            rid = req.id.no_dash
            if rid in self._seen:
                continue
            with quiet():
                code = req.code
                source = code.raw_code
            objects = {"request_id": rid, "code_id": code.id.no_dash}
            params: dict[str, Any] = {"function": code.service_func_name,
                                      "syft_request_time": str(req.request_time)}
            try:
                spec = self.parse_request(source)
            except job_code.NotATemplateError as exc:
                params.update(template_ok=False, problem=str(exc)[:500],
                              purpose="arbitrary code (not the fedsyft template)")
            else:
                objects.update(job_id=spec.job_id, dataset_id=DATASET_NAME)
                params.update(template_ok=True, spec_fingerprint=spec.fingerprint,
                              spec=spec.to_json(), purpose=(
                                  f"train {spec.model} for at most {spec.rounds} rounds, "
                                  f"{spec.aggregation} aggregation"))
            self.guard.audit.append(req.requesting_user_email, AuditRole.DATA_SCIENTIST,
                                    Action.REQUEST_SUBMITTED, objects=objects,
                                    code_hash=job_code.code_hash(source), params=params)
            self._seen.add(rid)

    # ---- requests -----------------------------------------------------------------------
    def _requests(self) -> list[Any]:
        with quiet():
            reqs = list(self.owner_client().api.services.request.get_all())
        self._observe(reqs)  # the first time the site sees a request, it is logged
        return reqs

    def _request(self, request_id: str) -> Any:
        for req in self._requests():
            if str(req.id.no_dash).startswith(request_id.replace("-", "")) and request_id:
                return req
        raise RequestNotFoundError(f"no request {request_id!r} at site {self.name!r}")

    def requests(self) -> list[RequestSummary]:
        out = []
        for req in self._requests():
            code = req.code
            try:
                job_id = self.parse_request(code.raw_code).job_id
            except job_code.NotATemplateError:
                job_id = ""
            out.append(RequestSummary(req.id.no_dash, req.requesting_user_email,
                                      str(req.status.name).lower(), code.service_func_name,
                                      job_id))
        return out

    def review(self, request_id: str) -> Review:
        return self._review(self._request(request_id))

    def _review(self, req: Any) -> Review:
        source = req.code.raw_code
        spec, ok, problem = None, True, ""
        try:
            spec = self.parse_request(source)
        except job_code.NotATemplateError as exc:
            ok, problem = False, str(exc)
        violations: tuple[str, ...] = ()
        budget = ""
        if self.holds_data:
            pinned = spec or job_code.pinned_spec(source)
            if pinned is not None:
                violations = tuple(self.guard.privacy.check_job(pinned,
                                                                req.requesting_user_email))
            budget = self._budget_words()
        return Review(req.id.no_dash, self.name, req.requesting_user_email,
                      str(req.status.name).lower(), source, spec, ok, problem,
                      violations=violations, budget=budget)

    # ---- the dataset's policy and privacy budget ---------------------------------------------
    def policy(self) -> DatasetPolicy:
        """The data owner's current policy for this site's dataset."""
        return self.guard.privacy.policy()

    def set_policy(self, policy: DatasetPolicy | None = None, *, reason: str = "",
                   **changes: Any) -> DatasetPolicy:
        """Replace the policy, or change some of its fields (``max_rounds=20``...).

        Only the data owner may; logged (``policy_changed``) before it takes effect, then the
        dataset description the data scientist reads is rewritten. Running jobs are held to
        the new policy from their next call on.
        """
        self._require_owner("change the dataset policy")
        try:
            new = policy or DatasetPolicy.model_validate({**self.policy().model_dump(),
                                                          **changes})
        except ValueError as exc:
            raise PolicyError(f"invalid policy for dataset {DATASET_NAME!r} at site "
                              f"{self.name!r}: {exc}") from None
        self.guard.privacy.set_policy(new, self.operator.email, reason)
        self._refresh_description()
        return new

    def privacy_spent(self) -> dict[str, Any]:
        """The dataset's ledger: epsilon/delta spent, per job, and unaccounted overrides."""
        return self.guard.privacy.ledger.snapshot()["datasets"].get(
            DATASET_NAME, {"epsilon_spent": 0.0, "delta_spent": 0.0, "jobs": {},
                           "unaccounted": []})

    def _budget_words(self) -> str:
        pol, spent = self.policy(), self.guard.privacy.ledger.spent(DATASET_NAME)
        return (f"dataset {DATASET_NAME!r} has spent epsilon {spent:.4g} of its budget "
                f"{pol.epsilon_budget:g} ({max(0.0, pol.epsilon_budget - spent):.4g} left)")

    def _refresh_description(self) -> None:
        """Rewrite the syft dataset's description (base text + current policy).

        Syft 0.9.5 has no dataset-update service, so the owner's process updates the record
        in the server's own store (the server runs in this process).
        """
        if not self.holds_data:
            return
        from syft.util.misc_objs import MarkdownDescription

        stash = self.server.services.dataset.stash
        with quiet():
            dataset = stash.get_by_name(self.server.verify_key, DATASET_NAME).unwrap()
            dataset.description = MarkdownDescription(text=self.guard.privacy.describe())
            stash.update(self.server.verify_key, dataset).unwrap()

    def parse_request(self, source: str):
        """The job spec pinned by ``source`` if it is this site's template (else raises)."""
        return job_code.parse_request(source, self.name)

    def call_limits(self, spec):
        """Calls of each action one approval allows at this site."""
        from datasites.guard import call_limits

        return call_limits(spec)

    def approve(self, request_id: str, reason: str = "", *,
                override_reason: str | None = None) -> Review:
        """Approve a request that is exactly the fedsyft template and complies with the
        dataset's policy; records the limits first.

        Only the data owner may approve. The decision is logged (``request_approved``, or
        ``request_overridden`` when it replaces a denial) before it takes effect. A policy
        violation (rounds, model, DP, clip, delta, min_sites, remaining budget, submitter)
        is refused with the reason. Code that is *not* the template is refused unless
        ``override_reason`` is given: see :meth:`_approve_override`.
        """
        self._require_owner(f"approve request {request_id}")
        req = self._request(request_id)
        review = self._review(req)
        if not review.template_ok or review.spec is None:
            return self._approve_override(req, review, override_reason)
        spec = review.spec
        if review.violations:
            self._refuse(f"approve request {review.request_id}",
                         f"job {spec.job_id!r} breaks the policy of dataset {DATASET_NAME!r}: "
                         + "; ".join(review.violations))
        ledger = self.guard.approval(spec.job_id)
        if review.status == "approved" or (ledger and not ledger.get("revoked")):
            self._refuse(f"approve request {review.request_id}",
                         f"job {spec.job_id!r} is already approved")
        code_hash = job_code.code_hash(review.code)
        limits = self.call_limits(spec)
        request = {"request_id": review.request_id, "code_id": req.code.id.no_dash,
                   "requester": review.requester}
        params: dict[str, Any] = {"reason": reason, "spec_fingerprint": spec.fingerprint,
                                  "limits": limits}
        objects = {"request_id": review.request_id, "job_id": spec.job_id,
                   "code_id": request["code_id"]}
        if review.status == "rejected":
            self.guard.audit.append(self.operator.email, AuditRole.DATA_OWNER,
                                    Action.REQUEST_OVERRIDDEN, objects=objects,
                                    code_hash=code_hash,
                                    params={**params, "decision": "approved",
                                            "previous": "denied"})
        else:
            self.guard.audit.append(self.operator.email, AuditRole.DATA_OWNER,
                                    Action.REQUEST_APPROVED, objects=objects,
                                    code_hash=code_hash, params=params)
        if ledger:
            self.guard.reinstate(spec.job_id)
        else:
            self.guard.record_approval(spec, code_hash, self.operator.email, limits,
                                       request=request)
        with quiet():
            res = req.approve()
        if isinstance(res, sy.SyftError):
            raise RuntimeError(f"syft could not approve request {request_id}: "
                               f"{syft_message(res)}")
        return review

    def _approve_override(self, req: Any, review: Review, override_reason: str | None
                          ) -> Review:
        """Approve code that is not the fedsyft template, on the data owner's explicit word.

        What an override means: the owner vouches for code the site cannot check. If the
        code still pins a fedsyft spec, that spec must comply with the policy and its calls
        through the fedsyft entry point keep every limit (calls, rounds, budget); anything
        else the code does is beyond the site's reach, so the ledger records the approval
        as *unaccounted*, and a dataset whose policy requires DP refuses overrides outright.
        Logged as ``request_overridden`` (with the reason and the problem) before it acts.
        """
        rid = review.request_id
        if not (override_reason or "").strip():
            self._refuse(f"approve request {rid}",
                         f"it cannot be approved: {review.problem} (code that is not the "
                         "fedsyft template needs an explicit override_reason)")
        if review.status == "approved":
            self._refuse(f"approve request {rid}", "it is already approved")
        if self.holds_data and self.policy().require_dp:
            self._refuse(f"approve request {rid}",
                         f"the policy of dataset {DATASET_NAME!r} requires differential "
                         "privacy, which the site cannot enforce on arbitrary code")
        if review.violations:
            self._refuse(f"approve request {rid}",
                         "the job spec it pins breaks the policy of dataset "
                         f"{DATASET_NAME!r}: " + "; ".join(review.violations))
        spec = job_code.pinned_spec(review.code)
        code_hash = job_code.code_hash(review.code)
        request = {"request_id": rid, "code_id": req.code.id.no_dash,
                   "requester": review.requester}
        objects = {"request_id": rid, "code_id": request["code_id"]}
        if spec is not None:
            objects["job_id"] = spec.job_id
        self.guard.audit.append(
            self.operator.email, AuditRole.DATA_OWNER, Action.REQUEST_OVERRIDDEN,
            objects=objects, code_hash=code_hash,
            params={"decision": "approved", "previous": f"not the template ({review.status})",
                    "reason": str(override_reason), "problem": review.problem[:500],
                    "template_ok": False,
                    "spec_fingerprint": spec.fingerprint if spec else None})
        if spec is not None and self.guard.approval(spec.job_id) is None:
            self.guard.record_approval(spec, code_hash, self.operator.email,
                                       self.call_limits(spec), request=request)
        if self.holds_data:
            self.guard.privacy.ledger.record_unaccounted(DATASET_NAME, {
                "request_id": rid, "code_hash": code_hash, "approved_by": self.operator.email,
                "reason": str(override_reason), "job_id": spec.job_id if spec else None})
        with quiet():
            res = req.approve()
        if isinstance(res, sy.SyftError):
            raise RuntimeError(f"syft could not approve request {rid}: {syft_message(res)}")
        return review

    def deny(self, request_id: str, reason: str) -> None:
        """Deny a request (or revoke an approved one), with a reason the scientist reads.

        Logged (``request_denied``, or ``request_overridden`` when it replaces an approval)
        before it takes effect; revoking also makes the guard refuse further calls.
        """
        self._require_owner(f"deny request {request_id}")
        if not reason.strip():
            raise ValueError("a denial needs a reason the data scientist can read")
        req = self._request(request_id)
        review = self._review(req)
        if review.status == "rejected":
            self._refuse(f"deny request {review.request_id}", "it is already denied")
        objects = {"request_id": review.request_id, "code_id": req.code.id.no_dash}
        if review.spec is not None:
            objects["job_id"] = review.spec.job_id
        code_hash = job_code.code_hash(review.code)
        if review.status == "approved":
            self.guard.audit.append(self.operator.email, AuditRole.DATA_OWNER,
                                    Action.REQUEST_OVERRIDDEN, objects=objects,
                                    code_hash=code_hash,
                                    params={"decision": "denied", "previous": "approved",
                                            "reason": reason})
            if review.spec is not None:
                self.guard.revoke(review.spec.job_id, self.operator.email, reason)
        else:
            self.guard.audit.append(self.operator.email, AuditRole.DATA_OWNER,
                                    Action.REQUEST_DENIED, objects=objects,
                                    code_hash=code_hash, params={"reason": reason})
        with quiet():
            res = req.deny(reason=reason)
        if isinstance(res, sy.SyftError):
            raise RuntimeError(f"syft could not deny request {request_id}: {syft_message(res)}")


def _audit_user(guard: SiteGuard, admin: Account, account: Account, store: str) -> None:
    """``user_registered``, written before the account exists."""
    guard.audit.append(admin.email, AuditRole.SYSTEM, Action.USER_REGISTERED,
                       objects={"user_id": account.email},
                       params={"email": account.email, "role": account.role.value,
                               "store": store})
