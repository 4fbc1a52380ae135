"""How the orchestrator obtains the *sum* of the sites' vectors for one call.

- :class:`PlainSum` — sites send vectors in clear; the orchestrator adds them.
- :class:`KeyAuthoritySum` — sites send signed packed-Paillier ciphertexts; the key
  authority (its own datasite) checks and sums them and decrypts only the sum.
- :class:`MaskedSum` — sites send vectors masked with pairwise and self masks (Bonawitz et
  al. 2017); the masks cancel in the sum; sites that stop answering after key sharing are
  recovered from the survivors' Shamir shares.

A secure variant never gives the orchestrator a single site's vector.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from fed_tasks.codec import decode_array
from fed_tasks.encoding import codec_for, round_id, secagg_plan, session_round
from fed_tasks.interface import SiteConnection, call_all
from fed_tasks.spec import JobSpec
from privacy.secagg import SecAggError
from privacy.secagg_session import SecAggSessionServer


class TooFewSitesError(RuntimeError):
    """Fewer sites answered than the job's minimum for an aggregate."""


class SecureSum(Protocol):
    """Calls ``action`` at every site and returns the decoded sum of their vectors."""

    def sum(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
            length: int) -> np.ndarray: ...


class PlainSum:
    """Sites' vectors in clear (allows robust aggregation; reveals individual updates)."""

    def __init__(self, min_sites: int = 1) -> None:
        self.min_sites = min_sites

    def sum(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
            length: int) -> np.ndarray:
        replies = call_all(sites, action, message)
        if len(replies) < self.min_sites:
            raise TooFewSitesError(f"{len(replies)} sites answered, job needs {self.min_sites}")
        return np.sum([decode_array(r["vector"], length) for r in replies], axis=0)


class KeyAuthoritySum:
    """Signed Paillier contributions, summed and decrypted only by the key authority."""

    def __init__(self, key_authority: SiteConnection) -> None:
        self.key_authority = key_authority

    def sum(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
            length: int) -> np.ndarray:
        replies = call_all(sites, action, message)
        request = {"action": action, "round": round_id(action, message.get("round", 0)),
                   "length": length, "contributions": [r["contribution"] for r in replies]}
        reply = self.key_authority.call("decrypt", request)
        return decode_array(reply["sum"], length)


def call_each(sites: list[SiteConnection], action: str, message_for: Any
              ) -> dict[str, dict[str, Any] | Exception]:
    """Call every site concurrently; a site that fails is reported, not raised."""
    from concurrent.futures import ThreadPoolExecutor

    def one(site: SiteConnection) -> dict[str, Any] | Exception:
        try:
            return site.call(action, message_for(site))
        except Exception as exc:  # noqa: BLE001 - a dropout, handled by the protocol
            return exc

    with ThreadPoolExecutor(max_workers=max(1, len(sites))) as pool:
        return dict(zip([s.name for s in sites], pool.map(one, sites), strict=True))


class MaskedSum:
    """The orchestrator's side of a multi-round secure sum (one session per job).

    It relays messages and learns only sums: two setup calls per site (keys, encrypted
    shares), then per aggregate one masked contribution and one unmasking call per site.
    """

    def __init__(self, spec: JobSpec, n_sites: int) -> None:
        self.spec = spec
        self.plan = secagg_plan(spec, n_sites)
        self.server = SecAggSessionServer(self.plan["threshold"], self.plan["bits"],
                                          self.plan["vector_length"], spec.job_id,
                                          self.plan["rounds"])
        self._ready = False
        self.dropped: dict[str, str] = {}

    def _setup(self, sites: list[SiteConnection]) -> None:
        adverts = call_all(sites, "secagg_advertise", {})
        directory = self.server.collect_keys([a["advert"] for a in adverts]).to_str()
        shares = call_all(sites, "secagg_share", {"directory": directory})
        self.server.route_shares([s["shares"] for s in shares])
        self._ready = True

    def sum(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
            length: int) -> np.ndarray:
        if not self._ready:
            self._setup(sites)
        r = session_round(action, message.get("round", 0))
        active = [s for s in sites if s.name in self.server.active]
        replies = call_each(active, action, lambda _s: message)
        for name, reply in replies.items():
            if isinstance(reply, Exception):
                self.dropped[name] = str(reply)
        masked = [rep["masked"] for rep in replies.values() if not isinstance(rep, Exception)]
        try:
            request = self.server.collect_masked(r, masked).to_str()
        except SecAggError as exc:
            raise TooFewSitesError(f"secure sum of {action!r}: {exc}; failures: "
                                   f"{self.dropped}") from None
        survivors = [s for s in active if s.name in self.server.survivors]
        n_terms = len(survivors)
        if n_terms < self.spec.min_sites:
            raise TooFewSitesError(f"secure sum of {action!r}: {n_terms} sites answered, the "
                                   f"job needs at least {self.spec.min_sites}; failures: "
                                   f"{self.dropped}")
        answers = call_each(survivors, "secagg_unmask", lambda s: {
            "round": r, "request": request, "inbox": self.server.inbox(s.name).to_str()})
        total = self.server.unmask(r, [a["shares"] for a in answers.values()
                                       if not isinstance(a, Exception)])
        codec = codec_for(self.spec, action)
        return codec.decode_sum([int(v) for v in total[:length]], n_terms=n_terms)
