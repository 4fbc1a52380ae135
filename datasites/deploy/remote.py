"""Reaching a running federation over HTTP: the data scientist's and the owners' clients.

``Federation.connect("federation.toml", email, password)`` (see :class:`RemoteFederation`)
logs the data scientist in to every site with syft's own ``sy.login``; the same
:class:`fed_tasks.orchestrator.FederatedTrainer` then runs over these sites as over
in-process ones. :class:`OwnerClient` is a data owner's session with her own site's server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasites.adapter.scientist import ScientistSession
from datasites.adapter.syft_server import login_http
from datasites.deploy.config import (
    FederationFile,
    MemberConfig,
    load,
    member_credentials,
    password_for,
)
from datasites.deploy.processes import ServerError, post_json, require_up
from fed_tasks.aggregation import KeyAuthoritySum, MaskedSum, PlainSum, SecureSum
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec


class NotApprovedError(RuntimeError):
    """A job some site has not approved (yet, or ever); names the sites."""


def secure_sum_for(spec: JobSpec, n_sites: int,
                   authority: Callable[[], ScientistSession]) -> SecureSum:
    """How the orchestrator sums the sites' vectors for ``spec``."""
    if spec.aggregation == "paillier":
        return KeyAuthoritySum(authority().connection(spec))
    if spec.aggregation == "plain":
        return PlainSum(spec.min_sites)
    if spec.aggregation == "secagg":
        return MaskedSum(spec, n_sites)
    raise ValueError(f"aggregation {spec.aggregation!r} is not available")


class RemoteFederation:
    """The data scientist logged in to every site of a running federation."""

    def __init__(self, cfg: FederationFile, email: str, password: str,
                 receipts: Path | str | None = None) -> None:
        self.config = cfg
        self._email, self._password = email, password
        self._receipts = receipts
        self._sessions: list[ScientistSession] | None = None
        self._authority: ScientistSession | None = None

    @classmethod
    def connect(cls, config: str | Path | FederationFile, email: str | None = None,
                password: str | None = None, receipts: Path | str | None = None
                ) -> RemoteFederation:
        """Log in everywhere (``email`` defaults to the config's scientist; ``password`` to
        ``FEDSYFT_SCIENTIST_PASSWORD`` or a prompt). Fails naming the first site that is
        down or refuses the login."""
        cfg = config if isinstance(config, FederationFile) else load(config)
        fed = cls(cfg, email or cfg.federation.scientist,
                  password or password_for("scientist"), receipts)
        fed.sessions()
        return fed

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.config.site]

    def _login(self, member: MemberConfig, kind: str) -> ScientistSession:
        require_up(member)
        client = login_http(member.host, member.port, self._email, self._password,
                            member.name)
        return ScientistSession(client, kind=kind, receipts=self._receipts)

    def sessions(self) -> list[ScientistSession]:
        if self._sessions is None:
            self._sessions = [self._login(s, "site") for s in self.config.site]
        return self._sessions

    def authority_session(self) -> ScientistSession:
        if self.config.key_authority is None:
            raise ValueError(f"{self.config.path} has no [key_authority]: Paillier jobs need "
                             "one")
        if self._authority is None:
            self._authority = self._login(self.config.key_authority, "authority")
        return self._authority

    def mocks(self, split: str = "train") -> dict[str, Any]:
        return {s.site: s.mock(split) for s in self.sessions()}

    def policies(self) -> dict[str, Any]:
        return {s.site: s.policy() for s in self.sessions()}

    def _job_sessions(self, spec: JobSpec) -> list[ScientistSession]:
        extra = [self.authority_session()] if spec.aggregation == "paillier" else []
        return [*self.sessions(), *extra]

    def submit(self, spec: JobSpec) -> dict[str, str]:
        """One code request per site (and the key authority for Paillier): name → id."""
        return {s.site: s.submit(spec) for s in self._job_sessions(spec)}

    def approvals(self, spec: JobSpec) -> dict[str, str]:
        """Each site's decision on the job so far: approved, pending or denied."""
        return {s.site: s.request_status(spec) for s in self._job_sessions(spec)}

    def wait_for_approval(self, spec: JobSpec, timeout: float = 0.0, poll: float = 2.0
                          ) -> None:
        """Return once every site approved ``spec``; a denial, or a site still pending after
        ``timeout`` seconds (0: look once), raises :class:`NotApprovedError`."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.approvals(spec)
            denied = [n for n, s in status.items() if s == "denied"]
            if denied:
                raise NotApprovedError(f"job {spec.job_id}: denied at {', '.join(denied)}")
            waiting = [n for n, s in status.items() if s != "approved"]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                pending = ", ".join(f"{n} ({status[n]})" for n in waiting)
                raise NotApprovedError(f"job {spec.job_id}: not approved yet at {pending}")
            time.sleep(poll)

    def connections(self, spec: JobSpec) -> list:
        return [s.connection(spec) for s in self.sessions()]

    def secure_sum(self, spec: JobSpec) -> SecureSum:
        return secure_sum_for(spec, len(self.config.site), self.authority_session)

    def trainer(self, spec: JobSpec, **kwargs: Any) -> FederatedTrainer:
        return FederatedTrainer(spec, self.connections(spec), secure_sum=self.secure_sum(spec),
                                **kwargs)


@dataclass(frozen=True)
class _Operator:
    email: str


class OwnerError(RuntimeError):
    """An owner action the site refused or could not do; its one-line reason."""


class OwnerClient:
    """A data owner's session with her own site's running server (``fedsyft requests``).

    Every action carries her credentials; the server checks them against syft's accounts
    and decides with its own guard, ledger and audit log."""

    def __init__(self, member: MemberConfig, email: str, password: str) -> None:
        require_up(member)
        self.member, self.name = member, member.name
        self.operator = _Operator(email)
        self._password = password

    @classmethod
    def connect(cls, config: str | Path | FederationFile, site: str,
                email: str | None = None, password: str | None = None) -> OwnerClient:
        """The owner of ``site`` (e-mail from the config; password from
        ``FEDSYFT_OWNER_PASSWORD[_SITE]`` or a prompt)."""
        return cls(*member_credentials(config, site, "owner", email, password))

    def _call(self, op: str, **args: Any) -> Any:
        try:
            answer = post_json(f"{self.member.url}/fedsyft/v1/owner",
                               {"email": self.operator.email, "password": str(self._password),
                                "op": op, "args": args})
        except OSError as exc:
            raise ServerError(f"site {self.name!r} at {self.member.url} did not answer "
                              f"({exc})") from None
        if not answer.get("ok"):
            raise OwnerError(str(answer.get("error")))
        return answer.get("result")

    def requests(self) -> list[Any]:
        from datasites.runtime.datasite import RequestSummary

        return [RequestSummary(**r) for r in self._call("requests")]

    def review(self, request_id: str) -> _RemoteReview:
        return _RemoteReview(**self._call("show", request_id=request_id))

    def approve(self, request_id: str, reason: str = "", *,
                override_reason: str | None = None) -> _RemoteReview:
        doc = self._call("approve", request_id=request_id, reason=reason,
                         override_reason=override_reason)
        return _RemoteReview(doc["words"], "")

    def deny(self, request_id: str, reason: str) -> None:
        self._call("deny", request_id=request_id, reason=reason)

    def policy(self) -> dict[str, Any]:
        return self._call("policy")

    def set_policy(self, reason: str = "", **changes: Any) -> dict[str, Any]:
        return self._call("set_policy", changes=changes, reason=reason)

    def privacy_spent(self) -> dict[str, Any]:
        return self._call("budget")


@dataclass(frozen=True)
class _RemoteReview:
    words: str
    code: str

    def plain_words(self) -> str:
        return self.words
