"""The compliance officer against a running site server (``fedsyft audit ... --config``).

No syft import: the officer's commands start in about a second. The server sends a copy of
the log; she verifies and reads it on her own machine with the same code as for a directory.
"""

from __future__ import annotations

from pathlib import Path

from datasites.deploy.config import (
    FederationFile,
    MemberConfig,
    member_credentials,
)
from datasites.deploy.processes import ServerError, post_json, require_up


class OfficerError(RuntimeError):
    """The site refused the officer (wrong password) or could not send its log."""


class OfficerClient:
    """A compliance officer's session with a site's running server (``fedsyft audit
    --config``): fetches a copy of the log to verify and read on her own machine."""

    def __init__(self, member: MemberConfig, email: str, password: str) -> None:
        require_up(member)
        self.member, self.name, self.email = member, member.name, email
        self._password = password

    @classmethod
    def connect(cls, config: str | Path | FederationFile, site: str,
                email: str | None = None, password: str | None = None) -> OfficerClient:
        """The officer of ``site`` (e-mail from the config; password from
        ``FEDSYFT_OFFICER_PASSWORD[_SITE]`` or a prompt)."""
        return cls(*member_credentials(config, site, "officer", email, password))

    def copy(self, purpose: str, directory: Path) -> Path:
        """Write the site's log copy into ``directory`` (owner-only) and return it."""
        from datasites.governance.compliance import write_copy

        try:
            answer = post_json(f"{self.member.url}/fedsyft/v1/officer",
                               {"email": self.email, "password": str(self._password),
                                "purpose": purpose})
        except OSError as exc:
            raise ServerError(f"site {self.name!r} at {self.member.url} did not answer "
                              f"({exc})") from None
        if not answer.get("ok"):
            raise OfficerError(str(answer.get("error")))
        files = (answer.get("result") or {}).get("files")
        if not isinstance(files, dict):
            raise ServerError(f"site {self.name!r} sent no audit log")
        return write_copy(files, directory)
