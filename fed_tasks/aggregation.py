"""How the orchestrator obtains the *sum* of the sites' vectors for one call.

- :class:`PlainSum` — sites send vectors in clear; the orchestrator adds them.
- :class:`KeyAuthoritySum` — sites send signed packed-Paillier ciphertexts; the key
  authority (its own datasite) checks and sums them and decrypts only the sum.

A secure variant never gives the orchestrator a single site's vector.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from fed_tasks.codec import decode_array
from fed_tasks.encoding import round_id
from fed_tasks.interface import SiteConnection, call_all


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
