"""The one thing the orchestrator needs from a site: make an approved call, get a reply.

``datasites`` implements this for PySyft datasites (in-process or HTTP); tests and the
in-memory baseline implement it directly over local frames.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


class SiteRefusedError(RuntimeError):
    """A site declined a call (budget spent, job not approved, policy); ``reason`` says why."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site {site!r} refused the call: {reason}")
        self.site = site
        self.reason = reason


class SiteUnreachableError(ConnectionError):
    """A site that did not answer at all (its server is down, or the network is)."""

    def __init__(self, site: str, detail: str) -> None:
        super().__init__(f"site {site!r} did not answer ({detail}); is its server up? "
                         "(fedsyft status) A job with a checkpoint continues with "
                         "fedsyft train --resume")
        self.site = site


#: How a site's refusal starts when a round would overspend a dataset's privacy budget; the
#: orchestrator then stops the job cleanly instead of failing (see FederatedTrainer.fit).
BUDGET_EXHAUSTED = "privacy budget exhausted"


def is_budget_refusal(exc: BaseException) -> bool:
    """True if ``exc`` (a site's refusal, or a secure sum that lost sites to such refusals)
    reports that a site's privacy budget would be overspent."""
    reason = exc.reason if isinstance(exc, SiteRefusedError) else str(exc)
    return BUDGET_EXHAUSTED in reason


@runtime_checkable
class SiteConnection(Protocol):
    """A data scientist's handle on one site for one approved job."""

    name: str

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        """Run the approved job code with ``action`` and return its reply.

        Raises :class:`SiteRefusedError` when the site refuses.
        """
        ...


def call_all(sites: list[SiteConnection], action: str, message: dict[str, Any]
             ) -> list[dict[str, Any]]:
    """Call every site concurrently (sites train in parallel); replies in site order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(sites))) as pool:
        return list(pool.map(lambda s: s.call(action, message), sites))
