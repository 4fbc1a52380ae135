"""One institution's datasite, as its data owner runs it: provision, publish, review, approve."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from datasites.adapter import job_code
from datasites.adapter.quiet import WATCHER_THREAD_PREFIX, quiet
from datasites.adapter.syft_server import (
    STORE_URL_FILE,
    ServiceRole,
    login,
    start_server,
    stop_server,
    sy,
    syft_message,
    watch_refusals,
)
from datasites.errors import AuthenticationError, ProvisioningError, RequestNotFoundError
from datasites.governance.accounts import (
    Account,
    Role,
    SyftUser,
    UserChange,
    UserRegistry,
    WeakPasswordError,
    check_password,
    new_password,
)
from datasites.governance.audit import KEY_NAME as AUDIT_KEY_NAME
from datasites.governance.audit import Action, AuditError
from datasites.governance.audit import Role as AuditRole
from datasites.governance.guard import (
    SiteGuard,
    frame_fingerprint,
    is_registered,
    register_guard,
    unregister_guard,
)
from datasites.governance.policy import DATASET_NAME as POLICY_DATASET
from datasites.governance.policy import DatasetPolicy, PolicyError, Requester
from datasites.governance.review import Review
from datasites.runtime.site_files import (
    SiteBusyError,
    SiteDirectoryError,
    SiteLock,
    check_store,
    is_staging,
    leftover_message,
    leftovers,
    make_private_directory,
    mark_complete,
    officer_email,
    read_site_info,
    secure_directory,
    staging_path,
    store_officer,
    write_private,
    write_site_info,
)
from datasites.runtime.tables import (
    MOCK_ROWS,
    MOCK_TIME_STEP,
    FederationSchema,
    make_mock,
    validate,
)
from fed_tasks.spec import JobSpec

DATASET_NAME = POLICY_DATASET  # the one dataset a site publishes (see datasites.governance.policy)
_SYFT_ROLES = {Role.DATA_OWNER: ServiceRole.DATA_OWNER,
               Role.DATA_SCIENTIST: ServiceRole.DATA_SCIENTIST}
_AUDIT_ROLES = {Role.ADMIN: AuditRole.SYSTEM, Role.DATA_OWNER: AuditRole.DATA_OWNER,
                Role.DATA_SCIENTIST: AuditRole.DATA_SCIENTIST,
                Role.COMPLIANCE_OFFICER: AuditRole.COMPLIANCE_OFFICER}
SYSTEM_ACTOR = "fedsyft"  # the site software itself, in audit entries
#: the operator of a hosted site between owner actions: it may decide nothing
HOST_OPERATOR = Account(SYSTEM_ACTOR, Role.ADMIN, "")
# The file-mode sweep leaves the audit signing key alone: AuditLog creates it 0600 and
# refuses to sign with it if others could read it (a human must decide about rotation).
_SWEEP_KEEP = frozenset({AUDIT_KEY_NAME})
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestSummary:
    request_id: str
    requester: str
    status: str
    function: str
    job_id: str = ""
    requester_id: str = ""  # the syft verify key that signed the request (stable)


class _StoredRequest:
    """A request read from syft's store, with its code resolved from the store too (a
    request's ``code`` property needs a client session)."""

    def __init__(self, request: Any, code: Any) -> None:
        self._request, self.code = request, code

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


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
        self._users = UserRegistry(directory)  # the syft accounts as last seen (users.json)
        self._users_lock = threading.Lock()
        self._observe_lock = threading.Lock()  # the watcher and the owner both observe
        self._acting_lock = threading.RLock()  # one owner action at a time (hosted sites)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        #: what ``open(..., repair=True)`` rebuilt, per file name (empty: nothing)
        self.repaired: dict[str, list[str]] = {}
        #: where a site still being built will be moved by :meth:`commit` (None: in place)
        self.target: Path | None = None

    # ---- provisioning -------------------------------------------------------------------
    @classmethod
    def provision(cls, name: str, directory: str | Path, *, train: pd.DataFrame,
                  test: pd.DataFrame, schema: FederationSchema, scientist: Account,
                  owner_email: str | None = None, mock_rows: int = MOCK_ROWS,
                  owner_password: str | None = None,
                  officer_email: str | None = None,
                  officer_password: str | None = None, commit: bool = True,
                  store: str | None = None) -> Datasite:
        """Start a datasite with fresh credentials, accounts and a published dataset.

        Tables are validated first; the site is built in a temporary directory and moved
        into place complete (``commit=False``: the caller commits it, see :meth:`commit`),
        so no half-provisioned site is left behind, even after a kill. The mocks are
        drawn with secret randomness and have ``mock_rows`` rows whatever the private size
        (see :func:`datasites.runtime.tables.make_mock`).
        """
        validate(train, schema, where=f"site {name!r} train split", min_rows=2)
        validate(test, schema, where=f"site {name!r} test split", min_rows=1)
        private = {"train": train.reset_index(drop=True), "test": test.reset_index(drop=True)}
        mocks = {k: make_mock(v, schema, mock_rows) for k, v in private.items()}
        description = (f"Private table of {name}: {schema.describe()}. "
                       "Mocks are synthetic: a fixed number of rows (not the private count), "
                       "each column drawn independently with secret randomness from a normal "
                       "with the column's rounded mean and std; no row-level information."
                       + (f" The mocks' time column {schema.time!r} is 0, {MOCK_TIME_STEP}, "
                          f"{2 * MOCK_TIME_STEP}, ... seconds, never the private times."
                          if schema.time else ""))
        return cls._provision(name, directory, scientist, owner_email, private, mocks,
                              description, owner_password=owner_password,
                              officer_email=officer_email, officer_password=officer_password,
                              commit=commit, store=store, time_column=schema.time)

    @classmethod
    def _provision(cls, name: str, directory: str | Path, scientist: Account,
                   owner_email: str | None, private: dict[str, pd.DataFrame],
                   mocks: dict[str, pd.DataFrame], description: str, *,
                   owner_password: str | None = None, officer_email: str | None = None,
                   officer_password: str | None = None, commit: bool = True,
                   store: str | None = None, time_column: str | None = None) -> Datasite:
        """Build the site in a temporary directory beside ``directory``; with ``commit``
        move it into place at once (:meth:`commit`), else the caller adds what else the
        site needs (federation config, keys) and commits it.

        All-or-nothing: an interruption (Ctrl-C, a kill) leaves at most the temporary
        ``.NAME.provisioning-…`` directory, which is named and refused later, never a site
        without its officer or policy that would fail as "wrong email or password".
        """
        if is_registered(name):
            raise ProvisioningError(f"a site called {name!r} is already running in this process")
        target = Path(directory)
        if target.exists() and any(target.iterdir()):
            raise ProvisioningError(f"site directory {target} is not empty")
        found = leftovers(target.parent, name)
        if found:
            raise ProvisioningError(f"site {name!r}: {leftover_message(found)}")
        directory = staging_path(target)
        try:  # chosen passwords meet the same rule, before anything is created
            owner_password = check_password(owner_password, "owner_password") \
                if owner_password else None
            officer_password = check_password(officer_password, "officer_password") \
                if officer_password else None
        except WeakPasswordError as exc:
            raise ProvisioningError(f"site {name!r}: {exc}") from None
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
        _reserve_officer_email(name, accounts)
        server = guard = lock = None
        try:
            make_private_directory(directory)  # 0700 before anything is written in it
            if store is not None:  # a postgresql:// URL with its password (0600, as keys)
                write_private(directory / STORE_URL_FILE, store)
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
                        email=acct.email, name=acct.name or role.value,
                        password=acct.password.reveal(), password_verify=acct.password.reveal(),
                        role=_SYFT_ROLES[role])
                if isinstance(res, sy.SyftError):
                    raise ProvisioningError(f"creating {role.value} account: {syft_message(res)}")
            officer = accounts[Role.COMPLIANCE_OFFICER]
            _audit_user(guard, root, officer, "fedsyft (read-only, not a syft user)")
            store_officer(directory, officer.email, officer.password)
            site = cls(name, directory, server, accounts, guard, lock=lock)
            site.target = target
            site._users.save(site._syft_users())  # the accounts just made: the baseline
            site._publish(private, mocks, description, time_column)
            secure_directory(directory, keep=_SWEEP_KEEP)  # what syft wrote with the umask
            register_guard(site.guard)
            site.start_watching()
        except BaseException as exc:  # Ctrl-C too: stop the server, remove the half-built dir
            if server is not None:
                stop_server(server)
            if guard is not None:
                guard.close()
            if lock is not None:
                lock.release()
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, ProvisioningError) or not isinstance(exc, Exception):
                raise
            raise ProvisioningError(f"site {name!r} could not be provisioned: {exc}") from exc
        return site.commit() if commit else site

    def commit(self) -> Datasite:
        """Move a site built by :meth:`_provision` into place; returns it reopened there.

        Why stop and reopen: syft's store URL and blob directory are paths inside the
        directory, and a running server would keep using the old ones after the rename. The
        completion marker is written last before the (atomic) rename; the reopen (about 1 s,
        against about 5 s for the provisioning itself) also proves that the site opens from
        its final place. The site's accounts (with their passwords) carry over.
        """
        target = self.target
        if target is None:  # already in place
            return self
        staging, accounts = self.directory, self.accounts
        try:
            self.close()
            mark_complete(staging)
            os.replace(staging, target)  # fails if target became a non-empty directory
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_directory(target.parent)
        owner = accounts[Role.DATA_OWNER]
        site = type(self).open(target, owner.email, owner.password)
        site.accounts = accounts
        return site

    def discard(self) -> None:
        """Close a site that was never committed and remove its temporary directory."""
        self.close()
        if self.target is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _publish(self, private: dict[str, pd.DataFrame], mocks: dict[str, pd.DataFrame],
                 description: str, time_column: str | None = None) -> None:
        # the time column is on record so that the schema check can keep it out of features
        assets_facts = {k: {"rows": len(v), "columns": [str(c) for c in v.columns],
                            "sha256": frame_fingerprint(v), "mock_rows": len(mocks[k]),
                            "mock_sha256": frame_fingerprint(mocks[k]),
                            **({"time_column": time_column} if time_column else {})}
                        for k, v in private.items()}
        self.guard.audit.append(self.operator.email, AuditRole.DATA_OWNER,
                                Action.DATASET_PUBLISHED, objects={"dataset_id": DATASET_NAME},
                                params={"name": DATASET_NAME, "assets": assets_facts,
                                        "rows": sum(len(v) for v in private.values()),
                                        "description": description})
        self.guard.register_assets(private, mocks)
        self.guard.privacy.policies.set_base_description(description)
        if self.holds_data:  # the scientist reads the owner's policy with the dataset
            # on record from the start, so policy.json can always be checked against the log
            self.guard.privacy.log_initial_policy(self.operator.email)
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
        """A syft client of this site; wrong credentials are refused and logged.

        The compliance officer's e-mail is reserved: whoever holds a syft account under it
        (renamed or registered later) gets no session through fedsyft.
        """
        if email.strip().lower() == self.officer_email:
            self._audit_failed_login(email, "syft login (e-mail reserved for the compliance "
                                     "officer, who is not a syft user)")
            raise AuthenticationError(f"cannot log in to site {self.name!r} as {email!r}: "
                                      "wrong email or password (this e-mail belongs to the "
                                      "site's compliance officer, who has no syft account)")
        try:
            return login(self.server, email, password, self.name)
        except AuthenticationError:
            self._audit_failed_login(email, "syft login")
            raise

    # ---- logged at once ---------------------------------------------------------------------
    def start_watching(self, interval: float | None = None) -> None:
        """Log each new request and account change within ``interval`` seconds of syft
        storing it (``FEDSYFT_WATCH_SECONDS``, default 2; 0 turns it off), not only when an
        owner happens to list requests: the audit trail must not depend on her habits."""
        if self._watcher is None:  # once: what syft refuses a scientist is on record too
            watch_refusals(self.server, self._audit_syft_refusal)
        if interval is None:
            interval = float(os.environ.get("FEDSYFT_WATCH_SECONDS", "2"))
        if interval <= 0 or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, args=(interval,), daemon=True,
                                         name=f"{WATCHER_THREAD_PREFIX}{self.name}")
        self._watcher.start()

    def _audit_syft_refusal(self, verify_key: str, path: str, message: str) -> None:
        """``call_refused`` for a syft call syft itself refused a scientist (best effort)."""
        record = self._users.by_key(verify_key)
        actor = record["email"] if record else "unknown-caller"
        role = AuditRole.DATA_SCIENTIST if record else AuditRole.SYSTEM
        try:
            self.guard.audit.append(actor, role, Action.CALL_REFUSED,
                                    params={"call": f"syft {path}", "reason": message[:500],
                                            "actor_id": verify_key, "refused_by": "syft"})
        except AuditError as exc:
            log.error("site %s: syft refusal not recorded: %s", self.name, exc)

    def _watch(self, interval: float) -> None:
        while not self._watch_stop.wait(interval):
            try:
                self.observe_accounts()
                self._observe(self._stored_requests())
            except Exception as exc:  # noqa: BLE001 - the next look retries; never crash
                log.debug("site %s: request watcher: %s", self.name, exc)

    def _stored_requests(self) -> list[Any]:
        """The requests the site has not logged yet, read from the server's own store (no
        client session: nothing printed, no stream swapped, a few ms)."""
        srv = self.server
        seen = self._seen or set()
        out = []
        for req in srv.services.request.stash.get_all(srv.verify_key).unwrap():
            if req.id.no_dash in seen:
                continue
            code = srv.services.user_code.stash.get_by_uid(srv.verify_key, req.code_id).unwrap()
            out.append(_StoredRequest(req, code))
        return out

    def close(self) -> None:
        """Stop the server and the guard, then make every file syft wrote while the site ran
        owner-only (its blob store follows the umask) before the lock is released."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        unregister_guard(self.guard)
        stop_server(self.server)
        self.guard.close()
        try:
            secure_directory(self.directory, keep=_SWEEP_KEEP)
        except (SiteDirectoryError, OSError) as exc:  # the directory was removed meanwhile
            log.warning("site %s: file modes not checked at close: %s", self.name, exc)
        if self._lock is not None:
            self._lock.release()

    # ---- restart --------------------------------------------------------------------------
    @classmethod
    def host(cls, directory: str | Path) -> Datasite:
        """Open a provisioned site to serve it (``fedsyft up``): no operator is logged in.

        Every owner action on a hosted site goes through :meth:`acting_as` with the owner's
        own credentials; until then, the site only answers syft's users and runs approved
        calls. Damaged ledger or policy files refuse the start (``fedsyft site repair``).
        """
        return cls.open(directory, None, None)

    @contextmanager
    def acting_as(self, email: str, password: str, what: str) -> Iterator[Datasite]:
        """This site with ``email`` as its operator for one owner action (hosted sites).

        The credentials are checked against syft's own accounts (a failure is logged as
        ``login_failed``); only the data owner or admin may act, and one action runs at a
        time."""
        with self._acting_lock:
            previous = self.operator, self._owner_client
            try:
                self.operator, self._owner_client = self._authenticate(email, password, what)
                yield self
            finally:
                self.operator, self._owner_client = previous

    def _authenticate(self, email: str, password: str, what: str) -> tuple[Account, Any]:
        """(operator account, syft client) for a data owner or admin of this site."""
        client = self.login(email, password)
        with quiet():
            syft_role = client.account.role
        role = {ServiceRole.DATA_OWNER: Role.DATA_OWNER,
                ServiceRole.ADMIN: Role.ADMIN}.get(syft_role)
        if role is None:
            self._refuse(what, f"{email!r} is not a data owner or admin of site {self.name!r}",
                         actor=Account(email, Role.DATA_SCIENTIST, ""))
        return Account(email, role, password), client

    @classmethod
    def open(cls, directory: str | Path, email: str | None, password: str | None, *,
             repair: bool = False) -> Datasite:
        """Reopen a provisioned site from its directory (after a restart), as ``email``.

        The syft store, server key and uid, the guard's ledger and the audit chain are all
        in the directory; the audit chain is verified before anything starts. Only the
        site's data owner (who may approve) or admin (who may only read) can open it.

        File modes first: a directory or file someone opened to others (``chmod``, a copy
        or restore under a loose umask) is made owner-only again before anything is read,
        and the repair is logged (``file_modes_repaired``, with the former modes) so the
        officer sees that the store may have been exposed. The audit signing key is the
        exception: if others could read it, the opening is refused (:class:`AuditKeyError`)
        because the operator must decide whether to rotate it.

        The privacy ledger and the policy file are checked against the signed audit log: a
        missing or disagreeing one refuses the opening (``SiteStateMismatch``, one line
        naming the file and what differs) and nothing is written. ``repair=True`` (the data
        owner only) rebuilds them from the log once the owner has logged in, logs
        ``site_state_rebuilt``, and opens the site; :attr:`repaired` says what was fixed.
        """
        directory = Path(directory)
        found = [] if is_staging(directory) else leftovers(directory.parent, directory.name)
        if found and not directory.exists():
            raise SiteDirectoryError(f"site directory {directory} does not exist; "
                                     f"{leftover_message(found)}")
        info = read_site_info(directory)  # refuses a staging or half-built directory
        if not (info.directory / STORE_URL_FILE).exists():  # a PostgreSQL store: syft's
            check_store(info.directory)  # before anything starts: syft would make a new one
        if found:
            log.warning("site %s: %s", info.name, leftover_message(found))
        repaired = secure_directory(directory, keep=_SWEEP_KEEP)
        if is_registered(info.name):
            raise SiteBusyError(f"a site called {info.name!r} is already running in this "
                                "process")
        lock = SiteLock(info.directory, info.name)
        guard = server = None
        try:
            # AuditLogCorrupt if tampered with; SiteStateMismatch if ledger/policy disagree
            guard = SiteGuard(info.name, info.directory, check_files=not repair)
            if repaired:
                _audit_repair(guard, repaired)
            root_email = info.email(Role.ADMIN.value)
            server = start_server(info.name, info.directory, root_email, new_password(),
                                  reset=False)
            accounts = {Role(r): Account(e, Role(r), "", "") for r, e in info.accounts.items()
                        if r in Role.__members__.values()}
            if email is None:  # hosted: owner actions arrive later, each with its login
                site = cls(info.name, info.directory, server, accounts, guard,
                           operator=HOST_OPERATOR, lock=lock)
            else:
                site = cls(info.name, info.directory, server, accounts, guard,
                           operator=Account(email, Role.DATA_OWNER, password), lock=lock)
                site.operator, site._owner_client = site._authenticate(email, password,
                                                                       "open the site")
            if repair:
                site._repair_files()
            site.observe_accounts()
            register_guard(guard)
            site.start_watching()
            return site
        except BaseException:
            if server is not None:
                stop_server(server)
            if guard is not None:
                guard.close()
            lock.release()
            raise

    def _repair_files(self) -> None:
        """Rebuild the ledger and policy files from the verified audit log (owner only)."""
        if self.guard.privacy.file_problems:
            self._require_owner("rebuild its privacy ledger and policy from the audit log")
        self.repaired = self.guard.privacy.repair(self.operator.email)
        if self.repaired and self.holds_data:
            self._refresh_description()  # the scientist reads the restored policy

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

    # ---- identity: syft accounts by their stable id -------------------------------------
    @property
    def officer_email(self) -> str:
        """The compliance officer's e-mail (lower case): reserved, never a syft account."""
        officer = self.accounts.get(Role.COMPLIANCE_OFFICER)
        try:
            return (officer.email if officer else officer_email(self.directory)).lower()
        except SiteDirectoryError:
            return ""

    def _syft_users(self) -> list[SyftUser]:
        """Syft's user list, read from the server's own store (in this process: a few ms).

        The store, not the API: syft's ``UserView`` carries no verify key.
        """
        with quiet():
            users = self.server.services.user.stash.get_all(self.server.verify_key).unwrap()
        return [SyftUser(u.id.no_dash, str(u.email), str(u.verify_key),
                         u.role.name.lower() if u.role is not None else "none") for u in users]

    def observe_accounts(self) -> list[UserChange]:
        """Compare syft's user list with the site's record; log and record every change.

        Syft reports no account change (a user may rename her own e-mail, or even her
        key field), so the site looks whenever it acts on requests (listing, review,
        approval, deny) and at open: ``user_registered`` for a new account,
        ``user_changed`` for a new e-mail, key or role, ``user_removed`` for one gone. An
        account holding the officer's reserved e-mail is flagged (``reserved_for``).
        Cheap: one read of the user table, a write only when something changed.
        """
        with self._users_lock:
            current = self._syft_users()
            if not self._users.exists:  # a site from before the record: baseline only
                self._users.save(current)
                return []
            changes = self._users.diff(current)
            for change in changes:
                self._audit_user_change(change, "syft user list")
            if changes:
                self._users.save(current)
            return changes

    def _audit_user_change(self, change: UserChange, seen_in: str,
                           objects: dict[str, str] | None = None) -> None:
        user = change.user
        params: dict[str, Any] = {"actor_id": user.verify_key, "email": user.email,
                                  "role": user.role, "seen_in": seen_in}
        if change.field == "registered":
            action = Action.USER_REGISTERED
            params.update(store="syft", registered_by="not reported by syft")
        elif change.field == "removed":
            action, params["reason"] = Action.USER_REMOVED, "no longer in syft's user list"
        else:
            action = Action.USER_CHANGED
            params.update(field=change.field, old=change.old, new=change.new)
        if self.officer_email and self.officer_email in (change.new.lower(),
                                                         user.email.lower()):
            params["reserved_for"] = "compliance_officer"
            log.warning("site %s: syft user %s holds the compliance officer's e-mail %s",
                        self.name, user.user_id, user.email)
        self.guard.audit.append(SYSTEM_ACTOR, AuditRole.SYSTEM, action,
                                objects={"user_id": user.user_id, **(objects or {})},
                                params=params)

    def _requester(self, req: Any) -> tuple[Requester, str]:
        """Who made ``req``: the verify key that signed it, and the readable audit actor
        (the e-mail the site first recorded for that account, else the request's)."""
        key = str(req.requesting_user_verify_key)
        record = self._users.by_key(key) or {}
        actor = record.get("registered_email") or str(req.requesting_user_email or "")
        return Requester(key, actor), actor

    def _identity_violations(self, req: Any) -> list[str]:
        """Refusals about who asked: an account under the officer's reserved e-mail."""
        record = self._users.by_key(str(req.requesting_user_verify_key)) or {}
        emails = {str(req.requesting_user_email or "").lower(), record.get("email", "").lower()}
        if self.officer_email and self.officer_email in emails:
            return [f"the requesting syft account holds {self.officer_email}, the e-mail "
                    "reserved for this site's compliance officer (not a syft user); the site "
                    "accepts no request from it"]
        return []

    def _operator_id(self) -> str:
        """The verify key of the operator's syft session (the owner's stable id)."""
        return str(self.owner_client().credentials.verify_key)

    def _observe(self, reqs: list[Any]) -> None:
        """``request_submitted`` for each request the site has not logged yet.

        The actor is the account as the site recorded it, with its stable id
        (``actor_id``); an e-mail in the request that differs from the record (a rename
        between two looks at the user list) is logged as ``user_changed`` too.
        """
        with self._observe_lock:
            self._observe_locked(reqs)

    def _observe_locked(self, reqs: list[Any]) -> None:
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
            who, actor = self._requester(req)
            shown = str(req.requesting_user_email or "")
            record = self._users.by_key(who.user_id)
            if record and shown.lower() != record["email"].lower():
                user = SyftUser(record.get("user_id", ""), record["email"], who.user_id,
                                record["role"])
                self._audit_user_change(UserChange(user, "email", record["email"], shown),
                                        f"request {rid}", objects={"request_id": rid})
            params.update(actor_id=who.user_id, requester_email=shown)
            self.guard.audit.append(actor, AuditRole.DATA_SCIENTIST,
                                    Action.REQUEST_SUBMITTED, objects=objects,
                                    code_hash=job_code.code_hash(source), params=params)
            self._seen.add(rid)

    # ---- requests -----------------------------------------------------------------------
    def _requests(self) -> list[Any]:
        self.observe_accounts()  # account changes first: the requests are judged by id
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
            who, actor = self._requester(req)
            out.append(RequestSummary(req.id.no_dash, actor, str(req.status.name).lower(),
                                      code.service_func_name, job_id, who.user_id))
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
        who, actor = self._requester(req)
        violations = tuple(self._identity_violations(req))
        budget, warnings, rows = "", (), self._train_rows()
        if self.holds_data:
            pinned = spec or job_code.pinned_spec(source)
            if pinned is not None:  # the submitter check compares who.user_id, not e-mails
                violations += tuple(self.guard.privacy.check_job(pinned, who, rows=rows))
                violations += tuple(self._schema_violations(pinned))
                warnings = tuple(self.policy().warnings(pinned, rows))
            budget = self._budget_words()
        return Review(req.id.no_dash, self.name, actor, str(req.status.name).lower(), source,
                      spec, ok, problem, violations=violations, budget=budget,
                      requester_id=who.user_id, train_rows=rows, warnings=warnings)

    def _published_train(self) -> dict[str, Any]:
        """What this site's log recorded of the train split at publication (rows, columns)."""
        if not self.holds_data:
            return {}
        try:
            published = self.guard.audit.entries(action=Action.DATASET_PUBLISHED)
            return dict(published[-1]["params"]["assets"]["train"])
        except (IndexError, KeyError, TypeError, ValueError, AuditError):
            return {}

    def _train_rows(self) -> int | None:
        """The private train split's row count (the owner's review may state it; it never
        leaves the site)."""
        rows = self._published_train().get("rows")
        return int(rows) if isinstance(rows, int) else None

    def _schema_violations(self, spec: JobSpec | None) -> list[str]:
        """A job may only name columns of the published schema (features, label, time
        column), and may order rows by the site's time column but never train on it."""
        published = self._published_train()
        columns, time = published.get("columns"), published.get("time_column")
        if spec is None or not columns:
            return []
        wanted = [*([spec.time_column] if spec.time_column else []), *spec.features,
                  *([spec.label_column] if spec.label_column else [])]
        missing = [c for c in wanted if c not in columns]
        out = [f"columns {missing} are not in the published table's schema"] if missing else []
        if time and time in spec.features:
            out.append(f"column {time!r} is this site's time column: it may order a series "
                       "job's rows (time_column), never be a feature")
        if time and spec.time_column and spec.time_column != time:
            out.append(f"the job orders rows by {spec.time_column!r}, but this site's time "
                       f"column is {time!r}")
        return out

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

        ``allowed_submitters`` may be e-mails: each is bound here to the syft account that
        holds it now (its verify key), because a user can rename her e-mail afterwards; an
        e-mail the current policy already binds keeps its binding.
        """
        self._require_owner("change the dataset policy")
        old = self.policy()
        try:
            new = policy or DatasetPolicy.model_validate({**old.model_dump(), **changes})
        except ValueError as exc:
            raise PolicyError(f"invalid policy for dataset {DATASET_NAME!r} at site "
                              f"{self.name!r}: {exc}") from None
        self.observe_accounts()  # a rename just before the binding is on record first
        users = self._syft_users()
        new = new.bind_submitters(lambda email: self._user_id_for_email(email, users),
                                  previous=old)
        self.guard.privacy.set_policy(new, self.operator.email, reason)
        self._refresh_description()
        return new

    def _user_id_for_email(self, email: str, users: list[SyftUser]) -> str | None:
        """The verify key of the account in ``users`` holding ``email`` (None: no such
        account, and the policy entry then matches nobody); the officer's is refused."""
        if email.lower() == self.officer_email:
            raise PolicyError(f"{email} is the compliance officer's e-mail at site "
                              f"{self.name!r}: reserved, not a syft account that may submit")
        found = [u for u in users if u.email.lower() == email.lower()]
        if not found:
            log.warning("site %s: allowed submitter %s has no syft account; it matches "
                        "nobody until the policy is set again", self.name, email)
        return found[0].verify_key if found else None

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
        from datasites.governance.guard import call_limits

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
        request = _request_record(review, req.code.id.no_dash)
        params: dict[str, Any] = {"reason": reason, "spec_fingerprint": spec.fingerprint,
                                  "limits": limits, "actor_id": self._operator_id(),
                                  "requester": review.requester,
                                  "requester_id": review.requester_id}
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
        request = _request_record(review, req.code.id.no_dash)
        objects = {"request_id": rid, "code_id": request["code_id"]}
        if spec is not None:
            objects["job_id"] = spec.job_id
        self.guard.audit.append(
            self.operator.email, AuditRole.DATA_OWNER, Action.REQUEST_OVERRIDDEN,
            objects=objects, code_hash=code_hash,
            params={"decision": "approved", "previous": f"not the template ({review.status})",
                    "reason": str(override_reason), "problem": review.problem[:500],
                    "template_ok": False,
                    "spec_fingerprint": spec.fingerprint if spec else None,
                    "actor_id": self._operator_id(), "requester": review.requester,
                    "requester_id": review.requester_id})
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
                                            "reason": reason, "actor_id": self._operator_id(),
                                            "requester_id": review.requester_id})
            if review.spec is not None:
                self.guard.revoke(review.spec.job_id, self.operator.email, reason)
        else:
            self.guard.audit.append(self.operator.email, AuditRole.DATA_OWNER,
                                    Action.REQUEST_DENIED, objects=objects,
                                    code_hash=code_hash,
                                    params={"reason": reason, "actor_id": self._operator_id(),
                                            "requester_id": review.requester_id})
        with quiet():
            res = req.deny(reason=reason)
        if isinstance(res, sy.SyftError):
            raise RuntimeError(f"syft could not deny request {request_id}: {syft_message(res)}")


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _audit_repair(guard: SiteGuard, repaired: dict[str, int]) -> None:
    """``file_modes_repaired``: which paths were open to others, and how, until now."""
    changed = {path: f"{mode:o}" for path, mode in sorted(repaired.items())[:100]}
    log.warning("site %s: %d paths in %s were not owner-only and were repaired: %s",
                guard.site, len(repaired), guard.directory, ", ".join(changed))
    guard.audit.append(SYSTEM_ACTOR, AuditRole.SYSTEM, Action.FILE_MODES_REPAIRED,
                       objects={"site": guard.site},
                       params={"count": len(repaired), "changed": changed,
                               "modes_now": {"directories": "700", "files": "600"}})


def _request_record(review: Review, code_id: str) -> dict[str, str]:
    """What the guard keeps of a request: ``requester`` is the stable syft id the policy is
    checked against at every call; ``requester_email`` the readable audit actor."""
    return {"request_id": review.request_id, "code_id": code_id,
            "requester": review.requester_id, "requester_email": review.requester}


def _reserve_officer_email(site: str, accounts: dict[Role, Account]) -> None:
    """No syft account may be provisioned under the officer's e-mail (it is no syft user)."""
    reserved = accounts[Role.COMPLIANCE_OFFICER].email.strip().lower()
    for role, account in accounts.items():
        if role != Role.COMPLIANCE_OFFICER and account.email.strip().lower() == reserved:
            raise ProvisioningError(f"site {site!r}: the {role.value} account cannot use "
                                    f"{account.email}, the compliance officer's e-mail (the "
                                    "officer is not a syft user; the e-mail is reserved)")


def _audit_user(guard: SiteGuard, admin: Account, account: Account, store: str) -> None:
    """``user_registered``, written before the account exists."""
    guard.audit.append(admin.email, AuditRole.SYSTEM, Action.USER_REGISTERED,
                       objects={"user_id": account.email},
                       params={"email": account.email, "role": account.role.value,
                               "store": store})
