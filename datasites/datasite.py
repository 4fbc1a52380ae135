"""One institution's datasite, as its data owner runs it: provision, publish, review, approve."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from datasites import job_code
from datasites.accounts import Account, Role, new_password
from datasites.errors import ProvisioningError, RequestNotFoundError
from datasites.guard import SiteGuard, is_registered, register_guard, unregister_guard
from datasites.quiet import quiet
from datasites.review import Review
from datasites.syft_server import ServiceRole, login, start_server, sy, syft_message
from datasites.tables import FederationSchema, make_mock, validate

DATASET_NAME = "records"
_SYFT_ROLES = {Role.DATA_OWNER: ServiceRole.DATA_OWNER,
               Role.DATA_SCIENTIST: ServiceRole.DATA_SCIENTIST}


@dataclass(frozen=True)
class RequestSummary:
    request_id: str
    requester: str
    status: str
    function: str


class Datasite:
    """A running PySyft datasite plus the site-side state fedsyft keeps beside it."""

    def __init__(self, name: str, directory: Path, server: Any, accounts: dict[Role, Account],
                 guard: SiteGuard) -> None:
        self.name = name
        self.directory = directory
        self.server = server
        self.accounts = accounts
        self.guard = guard
        self._owner_client: Any = None

    # ---- provisioning -------------------------------------------------------------------
    @classmethod
    def provision(cls, name: str, directory: str | Path, *, train: pd.DataFrame,
                  test: pd.DataFrame, schema: FederationSchema, scientist: Account,
                  owner_email: str | None = None, mock_rows: int = 500,
                  seed: int = 0) -> Datasite:
        """Start a datasite with fresh credentials, accounts and a published dataset.

        Tables are validated first; if anything fails afterwards the server is stopped and
        its directory removed, so no half-provisioned site is left behind.
        """
        validate(train, schema, where=f"site {name!r} train split", min_rows=2)
        validate(test, schema, where=f"site {name!r} test split", min_rows=1)
        if is_registered(name):
            raise ProvisioningError(f"a site called {name!r} is already running in this process")
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise ProvisioningError(f"site directory {directory} is not empty")
        accounts = {
            Role.ADMIN: Account(f"root@{name}.site", Role.ADMIN, new_password(), "Site admin"),
            Role.DATA_OWNER: Account(owner_email or f"owner@{name}.site", Role.DATA_OWNER,
                                     new_password(), "Data owner"),
            Role.DATA_SCIENTIST: scientist,
        }
        server = None
        try:
            root = accounts[Role.ADMIN]
            server = start_server(name, directory, root.email, root.password, reset=True)
            root_client = login(server, root.email, root.password, name)
            for role in (Role.DATA_OWNER, Role.DATA_SCIENTIST):
                acct = accounts[role]
                with quiet():
                    res = root_client.users.create(
                        email=acct.email, name=acct.name or role.value, password=acct.password,
                        password_verify=acct.password, role=_SYFT_ROLES[role])
                if isinstance(res, sy.SyftError):
                    raise ProvisioningError(f"creating {role.value} account: {syft_message(res)}")
            site = cls(name, directory, server, accounts, SiteGuard(name, directory))
            site._publish(train, test, schema, mock_rows, seed)
            register_guard(site.guard)
            return site
        except Exception as exc:
            if server is not None:
                with quiet():
                    server.stop()
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, ProvisioningError):
                raise
            raise ProvisioningError(f"site {name!r} could not be provisioned: {exc}") from exc

    def _publish(self, train: pd.DataFrame, test: pd.DataFrame, schema: FederationSchema,
                 mock_rows: int, seed: int) -> None:
        description = (f"Private table of {self.name}: {schema.describe()}. "
                       f"Mocks are synthetic (independent normals per column), no real row.")
        private = {"train": train.reset_index(drop=True), "test": test.reset_index(drop=True)}
        mocks = {k: make_mock(v, schema, mock_rows, seed + i)
                 for i, (k, v) in enumerate(private.items())}
        self.guard.register_assets(private, mocks)
        assets = [sy.Asset(name=k, data=private[k], mock=mocks[k]) for k in private]
        with quiet():
            res = self.owner_client().upload_dataset(
                sy.Dataset(name=DATASET_NAME, description=description, asset_list=assets))
        if isinstance(res, sy.SyftError):
            raise ProvisioningError(f"uploading dataset: {syft_message(res)}")

    def owner_client(self) -> Any:
        if self._owner_client is None:
            owner = self.accounts[Role.DATA_OWNER]
            self._owner_client = login(self.server, owner.email, owner.password, self.name)
        return self._owner_client

    def login(self, email: str, password: str) -> Any:
        return login(self.server, email, password, self.name)

    def close(self) -> None:
        unregister_guard(self.guard)
        with quiet():
            self.server.stop()

    # ---- requests -----------------------------------------------------------------------
    def _requests(self) -> list[Any]:
        with quiet():
            return list(self.owner_client().api.services.request.get_all())

    def _request(self, request_id: str) -> Any:
        for req in self._requests():
            if str(req.id.no_dash).startswith(request_id.replace("-", "")) and request_id:
                return req
        raise RequestNotFoundError(f"no request {request_id!r} at site {self.name!r}")

    def requests(self) -> list[RequestSummary]:
        out = []
        for req in self._requests():
            code = req.code
            out.append(RequestSummary(req.id.no_dash, req.requesting_user_email,
                                      str(req.status.name).lower(), code.service_func_name))
        return out

    def review(self, request_id: str) -> Review:
        req = self._request(request_id)
        source = req.code.raw_code
        spec, ok, problem = None, True, ""
        try:
            spec = job_code.parse_request(source, self.name)
        except job_code.NotATemplateError as exc:
            ok, problem = False, str(exc)
        return Review(req.id.no_dash, self.name, req.requesting_user_email,
                      str(req.status.name).lower(), source, spec, ok, problem)

    def approve(self, request_id: str) -> Review:
        """Approve a request that is exactly the fedsyft template; records the limits first."""
        review = self.review(request_id)
        if not review.template_ok or review.spec is None:
            raise PermissionError(f"request {request_id} at site {self.name!r} cannot be "
                                  f"approved: {review.problem}")
        self.guard.record_approval(review.spec, job_code.code_hash(review.code),
                                   self.accounts[Role.DATA_OWNER].email)
        with quiet():
            res = self._request(request_id).approve()
        if isinstance(res, sy.SyftError):
            raise RuntimeError(f"syft could not approve request {request_id}: "
                               f"{syft_message(res)}")
        return review

    def deny(self, request_id: str, reason: str) -> None:
        if not reason.strip():
            raise ValueError("a denial needs a reason the data scientist can read")
        with quiet():
            res = self._request(request_id).deny(reason=reason)
        if isinstance(res, sy.SyftError):
            raise RuntimeError(f"syft could not deny request {request_id}: {syft_message(res)}")
