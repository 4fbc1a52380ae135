"""How the orchestrator obtains the *sums* of the sites' vectors, one aggregate per call.

- :class:`PlainSum` — sites send vectors in clear; the orchestrator adds them.
- :class:`KeyAuthoritySum` — sites send signed packed-Paillier ciphertexts; the key
  authority (its own datasite) checks and sums them and decrypts only the sum.
- :class:`MaskedSum` — sites send vectors under pairwise and self masks (after Bonawitz et
  al. 2017, see :mod:`privacy.secagg_session`). The orchestrator adds them; only the sites
  can remove the self-masks, which they do with the *next* call, so each round costs one
  call per site and each sum is released one call later (``finish`` releases the last).

A secure variant never gives the orchestrator a single site's vector.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, NamedTuple, Protocol

import numpy as np

from fed_tasks.buffered import staleness_in
from fed_tasks.codec import decode_array
from fed_tasks.compression import contribution_vector
from fed_tasks.encoding import decode_session_sum, secagg_plan, session_round
from fed_tasks.interface import SiteConnection, call_all
from fed_tasks.schedule import combine, slot_index
from fed_tasks.spec import JobSpec
from privacy.secagg import SecAggError
from privacy.secagg_session import SecAggSessionServer
from privacy.signing import SignedContribution


class TooFewSitesError(RuntimeError):
    """Fewer sites answered than the job's minimum for an aggregate."""


class Released(NamedTuple):
    """A decoded sum the orchestrator may see: of which call (action, round) it is."""

    action: str
    round: int
    vector: np.ndarray


class SecureSum(Protocol):
    """Calls ``action`` at every site; returns the sums that became visible with it.

    The sites derive their model themselves from each aggregate, so every call after the
    first carries :meth:`evidence` of the previous one: what lets a site check it (see
    :class:`fed_tasks.messages.AggregateEvidence`)."""

    def submit(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
               length: int) -> list[Released]: ...

    def evidence(self) -> dict[str, Any] | None:
        """The evidence of the last aggregate collected (None before the first)."""
        ...

    def finish(self, sites: list[SiteConnection]) -> list[Released]:
        """Release any sum still pending (after the last round, or an early stop)."""
        ...

    def call_sites(self, sites: list[SiteConnection], action: str, message: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
        """A call outside the sums (evaluation), each site caught up first; site -> reply."""
        ...

    def session_state(self) -> dict[str, Any] | None:
        """What the orchestrator must keep to continue in a new process, beyond the
        evidence (a secure-sum session's public state; None where nothing is needed)."""
        ...

    def restore(self, evidence: dict[str, Any] | None,
                session: dict[str, Any] | None = None) -> None:
        """Continue after a checkpoint whose last aggregate had ``evidence``."""
        ...


class RoundTimeout(TimeoutError):
    """A site did not answer within the job's ``round_timeout`` (its call runs on)."""


def call_within(sites: list[SiteConnection], action: str, message_for: Any,
                timeout: float | None = None, busy: dict[str, Future] | None = None
                ) -> dict[str, dict[str, Any] | Exception]:
    """Call every site concurrently; a failure is reported, not raised, and so is a site
    still silent after ``timeout`` seconds (:class:`RoundTimeout`): its call keeps running
    in the background and is kept in ``busy``, so that it is not called again meanwhile."""

    def one(site: SiteConnection) -> dict[str, Any]:
        return site.call(action, message_for(site))

    if not sites:
        return {}
    pool = ThreadPoolExecutor(max_workers=len(sites))
    futures = {s.name: pool.submit(one, s) for s in sites}
    wait(list(futures.values()), timeout=timeout)
    pool.shutdown(wait=False)
    out: dict[str, dict[str, Any] | Exception] = {}
    for name, future in futures.items():
        if not future.done():
            out[name] = RoundTimeout(f"site {name!r} did not answer {action} within "
                                     f"{timeout:g} s")
            if busy is not None:
                busy[name] = future
        else:
            exc = future.exception()
            out[name] = exc if isinstance(exc, Exception) else future.result()
    return out


def wait_until(futures: dict[str, Future], full: Any, timeout: float | None) -> None:
    """Wait until ``full()`` holds, every call has ended, or ``timeout`` seconds passed (a
    buffered round: the buffer is full once enough updates are in)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not full() and not all(f.done() for f in futures.values()):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        wait([f for f in futures.values() if not f.done()], timeout=left,
             return_when=FIRST_COMPLETED)


def with_catch_up(message: dict[str, Any], history: list[dict[str, Any]],
                  seen: dict[str, int], site: str) -> dict[str, Any]:
    """``message`` with the evidence of the aggregates released since ``site`` was last
    called (``seen``: the history's length then) as ``catch_up``, but the last one, which
    the message carries as ``previous`` anyway."""
    if message.get("previous") is None or not history:
        return message
    missed = history[seen.get(site, len(history) - 1):-1]
    return {**message, "catch_up": missed} if missed else message


def call_caught_up(sites: list[SiteConnection], action: str, message_for: Any,
                   busy: dict[str, Future], timeout: float | None
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, Future]]:
    """A call outside the sums (evaluation) after every call still running has ended
    (``timeout`` at most); a site whose call is still running is not called. Returns the
    replies and the calls still running; a site's refusal is raised."""
    wait(list(busy.values()), timeout=timeout)
    busy = {name: f for name, f in busy.items() if not f.done()}
    replies = call_within([s for s in sites if s.name not in busy], action, message_for)
    for reply in replies.values():
        if isinstance(reply, Exception):
            raise reply
    return replies, busy  # type: ignore[return-value]


class _Immediate:
    """A sum visible as soon as the call returns.

    Sites may miss aggregates (not selected for a round, or too slow for it: see
    ``JobSpec.fraction`` / ``round_timeout``); each call relays to each site the evidence of
    every aggregate released since it was last called (``catch_up``), so that it derives
    the model itself as the others did."""

    def __init__(self) -> None:
        self._evidence: dict[str, Any] | None = None
        self._history: list[dict[str, Any]] = []  # every aggregate's evidence, in order
        self._seen: dict[str, int] = {}  # site -> how much of the history it was sent
        self._busy: dict[str, Future] = {}  # site -> a call that outlived its round
        self.timeout: float | None = None  # seconds a round waits for a site (None: all)
        self.last_skipped: dict[str, str] = {}  # the last call's sites left out, and why
        self._out: dict[str, str] = {}  # sites left out for good (no rejoining), and why
        self.buffer_k: int | None = None  # buffered rounds: aggregate once k updates are in
        self.spec: JobSpec | None = None  # the job (buffered rounds derive staleness from it)
        self.last_staleness: dict[str, int] = {}  # a buffered round: site -> staleness
        self.sent: dict[str, dict[str, int]] = {}  # the last call's sizes per site (sent_by)

    #: whether a site left out of a round may come back (plain mode: it catches up; a
    #: secure mode: it stays out, or two sums would differ by its update alone)
    rejoin = True

    def sum(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
            length: int) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def _message_for(self, site: SiteConnection, message: dict[str, Any]) -> dict[str, Any]:
        return with_catch_up(message, self._history, self._seen, site.name)

    def _call(self, sites: list[SiteConnection], action: str, message: dict[str, Any]
              ) -> list[dict[str, Any]]:
        """The replies of the sites that answered in time, in site order; a site's refusal
        or failure is raised (as before timeouts existed), a timeout is a skip."""
        if self.buffer_k is not None and action == "fit":
            return self._call_buffered(sites, action, message)
        if self.buffer_k is not None:  # after buffered rounds: the next phase needs everyone,
            wait(list(self._busy.values()), timeout=self.timeout)  # so let late calls end
        self._busy = {k: f for k, f in self._busy.items() if not f.done()}
        ready = [s for s in sites if s.name not in self._busy and s.name not in self._out]
        self.last_skipped = {s.name: "still computing an earlier call" for s in sites
                             if s.name in self._busy and s.name not in self._out}
        self.last_skipped |= {s.name: self._out[s.name] for s in sites if s.name in self._out}
        replies = call_within(ready, action, lambda s: self._message_for(s, message),
                              self.timeout, self._busy)
        for site in ready:
            self._seen[site.name] = len(self._history)
        for name, reply in replies.items():
            if isinstance(reply, RoundTimeout):
                self.last_skipped[name] = str(reply)
                if not self.rejoin:
                    self._out[name] = f"out of the job since: {reply}"
            elif isinstance(reply, Exception):
                raise reply
        return [r for r in replies.values() if not isinstance(r, Exception)]

    def _call_buffered(self, sites: list[SiteConnection], action: str,
                       message: dict[str, Any]) -> list[dict[str, Any]]:
        """A buffered round (FedBuff): call every idle site, then take the replies that are
        in once ``buffer_k`` of them are (or ``timeout`` passed), late ones from earlier
        rounds included. A site still computing keeps its call running; its update joins
        a later round's buffer (see :mod:`fed_tasks.buffered`)."""
        assert self.buffer_k is not None
        # a late update already in counts in this round, and its site is called again now
        arrived = {name: f for name, f in self._busy.items() if f.done()}
        running = {name: f for name, f in self._busy.items() if not f.done()}
        idle = [s for s in sites if s.name not in running and s.name not in self._out]
        pool = ThreadPoolExecutor(max_workers=max(1, len(idle)))
        called = {s.name: pool.submit(s.call, action, self._message_for(s, message))
                  for s in idle}
        for site in idle:
            self._seen[site.name] = len(self._history)
        pool.shutdown(wait=False)
        waiting = {**running, **called, **arrived}  # one update per site in a buffer

        kind: dict[str, str | None] = {}  # each finished call classified once

        def full() -> bool:  # K usable updates (too stale: none), enough of them fresh
            for name, f in waiting.items():
                if f.done() and name not in kind:
                    kind[name] = self._kind(f, message)
            kinds = list(kind.values())
            return (sum(k is not None for k in kinds) >= self.buffer_k
                    and kinds.count("fresh") >= self.fresh_needed)

        wait_until(waiting, full, self.timeout)
        done = {name: f for name, f in waiting.items() if f.done()}
        self._busy = {name: f for name, f in {**running, **called}.items()
                      if f is not done.get(name)}
        self.last_skipped = {s.name: self._out[s.name] for s in sites if s.name in self._out}
        replies = []
        for site in sites:  # in site order, as every party forms the aggregate
            if site.name in done:
                exc = done[site.name].exception()
                if isinstance(exc, Exception):
                    raise exc
                replies.append(done[site.name].result())
        return replies

    @property
    def fresh_needed(self) -> int:
        """A buffer's updates of the round itself, at least (the sites require min_sites)."""
        return self.spec.min_sites if self.spec is not None else 1

    def _kind(self, reply: Future, message: dict[str, Any]) -> str | None:
        """A buffered round's update is fresh (computed for this round), stale (at most
        ``max_staleness`` rounds old) or unusable; a failed call counts as fresh: it is
        raised, as in a synchronous round."""
        if self.spec is None or reply.exception() is not None:
            return "fresh"
        try:
            slot = SignedContribution.from_str(reply.result()["contribution"]).round
        except (KeyError, TypeError, ValueError):
            return "fresh"  # malformed: refused where the aggregate is formed
        index = slot_index(self.spec, "fit", int(message.get("round", 0)))
        if slot == index:
            return "fresh"
        return "stale" if index - slot <= self.spec.max_staleness else None

    def _buffer(self, signed: list[str], action: str, message: dict[str, Any]
                ) -> tuple[list[str], list[SignedContribution]]:
        """A buffered round's contributions that may join it: an update staler than the job
        allows is dropped and said so (:attr:`last_skipped`); each kept one's staleness goes
        to :attr:`last_staleness`. Raises if fewer than ``min_sites`` are of the round.
        Returns the kept contributions, as relayed and parsed."""
        self.last_staleness = {}
        parsed = [SignedContribution.from_str(raw) for raw in signed]
        if self.spec is None or self.spec.async_k is None or action != "fit":
            return signed, parsed
        index = slot_index(self.spec, action, int(message.get("round", 0)))
        kept: list[tuple[str, SignedContribution]] = []
        for raw, c in zip(signed, parsed, strict=True):
            if index - c.round > self.spec.max_staleness:  # too old to apply
                self.last_skipped[c.site_id] = (f"its update was {index - c.round} rounds "
                                                f"stale (the job allows "
                                                f"{self.spec.max_staleness})")
                continue
            kept.append((raw, c))
        self.last_staleness = staleness_in(self.spec, action, index,
                                           {c.site_id: c.round for _, c in kept})
        fresh = sum(v == 0 for v in self.last_staleness.values())
        if fresh < self.fresh_needed:
            raise TooFewSitesError(f"{fresh} updates of round {message.get('round')} came "
                                   f"in, the job needs {self.fresh_needed}")
        return [raw for raw, _ in kept], [c for _, c in kept]

    def submit(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
               length: int) -> list[Released]:
        total, self._evidence = self.sum(sites, action, message, length)
        self._history.append(self._evidence)
        return [Released(action, int(message.get("round", 0)), total)]

    def evidence(self) -> dict[str, Any] | None:
        return self._evidence

    def call_sites(self, sites: list[SiteConnection], action: str, message: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
        """A call outside the sums (evaluation), each site caught up first; site -> reply.
        A site still computing an earlier call is waited for (``timeout`` at most) and
        left out if it stays busy, as in :attr:`last_skipped`."""
        replies, self._busy = call_caught_up(
            [s for s in sites if s.name not in self._out], action,
            lambda s: self._message_for(s, message), self._busy, self.timeout)
        self.last_skipped = {name: "still computing an earlier call" for name in self._busy}
        return replies

    def finish(self, sites: list[SiteConnection]) -> list[Released]:
        return []

    def session_state(self) -> dict[str, Any] | None:
        """What a resumed job needs to catch sites up: the aggregates some site has not
        been sent yet (the history from the laggard on), and how far each site got."""
        if not self._seen:
            return None
        start = max(0, min(min(self._seen.values()), len(self._history) - 1))
        return {"seen": dict(self._seen), "offset": start, "history": self._history[start:],
                "out": dict(self._out)}

    def restore(self, evidence: dict[str, Any] | None,
                session: dict[str, Any] | None = None) -> None:
        self._evidence = evidence
        self._history = [evidence] if evidence is not None else []
        self._seen, self._out = {}, {}
        if session and session.get("history"):
            try:  # the history before ``offset`` every site already has: never sent again
                offset = int(session["offset"])
                tail = [dict(e) for e in session["history"]]
                self._history = [{}] * offset + tail
                self._seen = {str(k): int(v) for k, v in dict(session["seen"]).items()}
                self._out = {str(k): str(v) for k, v in dict(session.get("out") or {}).items()}
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"the checkpoint's catch-up state is unreadable: {exc}"
                                 ) from None


def _heads(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sites' signed audit heads, relayed so that each site keeps the others' receipts."""
    return [r["audit_head"] for r in replies if isinstance(r.get("audit_head"), dict)]


def sent_by(replies: list[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    """Site -> ``{"bytes": size of its signed contribution string as it left the site,
    "clipped": values the site clipped to its encoding's bound}`` (the reply's transport
    envelope may zlib-compress the string further)."""
    out = {}
    for reply in replies:
        text = str(reply[key])
        out[SignedContribution.from_str(text).site_id] = {
            "bytes": len(text), "clipped": int(reply.get("clipped") or 0)}
    return out


def _slot_of(reply: dict[str, Any]) -> int | None:
    """The slot a secure-sum reply's update was computed for (None if unreadable: the
    sites refuse it when they form the sum)."""
    try:
        return SignedContribution.from_str(reply["masked"]).round
    except (KeyError, TypeError, ValueError):
        return None


def _signed_payload(text: str) -> str:
    """The payload of a site's signed contribution (its signature is the sites' to check)."""
    return SignedContribution.from_str(text).payload


def _plain_vector(spec: JobSpec | None, action: str, payload: str, length: int) -> np.ndarray:
    """A plain contribution's vector, decoded as the sites decode it (a compressed update
    by the job's setting: :func:`fed_tasks.compression.contribution_vector`)."""
    if spec is None:
        return decode_array(payload, length)
    return contribution_vector(spec, action, payload, length)


class PlainSum(_Immediate):
    """Sites' vectors in clear (allows robust aggregation; reveals individual updates).

    Each vector is signed by its site; the next call forwards all of them so that every
    site can form the sum itself (and so sees the others' updates too)."""

    def __init__(self, min_sites: int = 1, spec: JobSpec | None = None) -> None:
        super().__init__()
        self.min_sites = min_sites
        self.spec = spec  # the job whose strategy combines a round (None: a plain sum)

    @property
    def fresh_needed(self) -> int:
        return self.min_sites

    def sum(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
            length: int) -> tuple[np.ndarray, dict[str, Any]]:
        replies = self._call(sites, action, message)
        if len(replies) < self.min_sites:
            raise TooFewSitesError(f"{len(replies)} sites answered, job needs {self.min_sites}")
        signed = [r["contribution"] for r in replies]
        self.sent = sent_by(replies, "contribution")
        signed, parsed = self._buffer(signed, action, message)
        total = combine(action, {c.site_id: _plain_vector(self.spec, action, c.payload, length)
                                 for c in parsed}, self.spec, self.last_staleness)
        return total, {"kind": "plain", "action": action,
                       "round": int(message.get("round", 0)), "contributions": signed,
                       "heads": _heads(replies)}


class KeyAuthoritySum(_Immediate):
    """Signed Paillier contributions, summed and decrypted only by the key authority, which
    signs the sum it decrypted (the sites accept nothing else)."""

    rejoin = False  # a site that missed a sum never comes back (see _Immediate.rejoin)

    def __init__(self, key_authority: SiteConnection) -> None:
        super().__init__()
        self.key_authority = key_authority

    def sum(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
            length: int) -> tuple[np.ndarray, dict[str, Any]]:
        replies = self._call(sites, action, message)
        self.sent = sent_by(replies, "contribution")
        signed, _ = self._buffer([r["contribution"] for r in replies], action, message)
        request = {"action": action, "round": int(message.get("round", 0)),
                   "length": length, "contributions": signed}
        reply = self.key_authority.call("decrypt", request)
        return decode_array(reply["sum"], length), {
            "kind": "paillier", "action": action, "round": int(message.get("round", 0)),
            "sum": reply["sum"], "attestation": reply["attestation"], "heads": _heads(replies)}


def call_each(sites: list[SiteConnection], action: str, message_for: Any
              ) -> dict[str, dict[str, Any] | Exception]:
    """Call every site concurrently and wait for all; a site that fails is reported, not
    raised."""
    return call_within(sites, action, message_for)


class MaskedSum:
    """The orchestrator's side of a job's secure-sum session.

    Setup: two calls per site (keys, encrypted shares relayed unread). Then each aggregate
    costs ONE call per site: the call carries the previous aggregate's masked sum, which the
    sites open (and use) before masking their new vector. A round in which sites stop
    answering costs one recovery call at the survivors. With buffered rounds
    (``spec.async_k``: :meth:`_submit_buffered`) a site that misses a round is out of that
    round only.
    """

    def __init__(self, spec: JobSpec, n_sites: int) -> None:
        self.spec, self.n_sites = spec, n_sites
        self._ready = False
        if spec.model == "auto":  # a template: each candidate runs its own session
            return  # (fed_tasks.selection.for_candidate)
        self.plan = secagg_plan(spec, n_sites)
        self.server = SecAggSessionServer(self.plan["threshold"], self.plan["bits"],
                                          self.plan["vector_length"], spec.job_id,
                                          self.plan["rounds"],
                                          round_bits=self.plan["round_bits"],
                                          buffered=spec.async_k is not None)
        self._pending: tuple[str, int] | None = None  # (action, round) awaiting opening
        self._unreturned: list[Released] = []  # opened by a call that then failed
        self._evidence: dict[str, Any] | None = None  # signed inputs of the pending round
        self.dropped: dict[str, str] = {}
        self.timeout: float | None = None  # a site silent this long drops out of the session
        self.last_skipped: dict[str, str] = {}  # the last call's new dropouts, and why
        self.sent: dict[str, dict[str, int]] = {}  # the last call's sizes per site (sent_by)
        # buffered rounds (spec.async_k): a round's sum is over the sites called, summed
        # once ``buffer_k`` answered; a site still computing keeps its call running and
        # catches up on the sums it missed (``_history``) at its next call
        self.buffer_k: int | None = None
        self.last_staleness: dict[str, int] = {}
        self._busy: dict[str, Future] = {}
        self._history: list[dict[str, Any]] = []
        self._seen: dict[str, int] = {}  # site -> len(_history) at its last call
        self._answered: set[str] = set()  # sites that opened their shares inbox

    def _setup(self, sites: list[SiteConnection]) -> None:
        adverts = call_all(sites, "secagg_advertise", {})
        directory = self.server.collect_keys([a["advert"] for a in adverts]).to_str()
        shares = call_all(sites, "secagg_share", {"directory": directory})
        self.server.route_shares([s["shares"] for s in shares])
        self._ready = True

    def _release(self, replies: dict[str, dict[str, Any] | Exception]) -> list[Released]:
        """Check and decode the pending sum from the sites that opened it."""
        if self._pending is None:
            return []
        opened = [rep["opened"] for name, rep in replies.items()  # (a buffered job's other
                  if not isinstance(rep, Exception) and rep.get("opened")  # sites catch up)
                  and name in self.server.survivors]
        if not opened:
            return []
        action, rnd = self._pending
        r = session_round(self.spec, action, rnd)
        total = self.server.collect_opened(r, opened)  # every opener agrees, over survivors
        _, vector = decode_session_sum(self.spec, r, total, len(self.server.survivors))
        self._pending = None
        return [Released(action, rnd, vector)]

    def evidence(self) -> dict[str, Any] | None:
        """The signed masked inputs (and revealed keys) of the last round collected: each
        site forms and opens that sum itself."""
        return self._evidence

    def submit(self, sites: list[SiteConnection], action: str, message: dict[str, Any],
               length: int) -> list[Released]:
        if not self._ready:
            self._setup(sites)
        if self.spec.async_k is not None:
            return self._submit_buffered(sites, action, message)
        rnd = int(message.get("round", 0))
        first = self.server.round == 0
        active = [s for s in sites if s.name in self.server.active]
        replies = call_within(active, action, lambda s: {
            **message, **({"inbox": self.server.inbox(s.name).to_str()} if first else {})},
            self.timeout)
        self.last_skipped = {s.name: "out of the secure sum since it dropped: "
                             + self.dropped.get(s.name, "")
                             for s in sites if s.name not in self.server.active}
        for name, reply in replies.items():
            if isinstance(reply, Exception):
                self.dropped[name] = self.last_skipped[name] = str(reply)
        released = self._release(replies)
        try:
            self._evidence = self._collect(action, rnd, active, replies)
        except TooFewSitesError:
            self._unreturned += released  # the previous sum was opened: finish() returns it
            raise
        self._pending = (action, rnd)
        return released

    def _submit_buffered(self, sites: list[SiteConnection], action: str,
                         message: dict[str, Any]) -> list[Released]:
        """A buffered round: call every site not still computing (the round's roster); sum
        once ``buffer_k`` answered, at least ``min_sites`` with an update of this very
        round (the others: a late update their site masked again). A roster member still
        computing is recovered for this round only; its late reply, masked for a round
        summed without it, is never used: the site masks that update again when next
        called. The phases after the rounds wait for every site."""
        rnd = int(message.get("round", 0))
        fit = action == "fit"
        if not fit:
            wait(list(self._busy.values()), timeout=self.timeout)
        self._busy = {n: f for n, f in self._busy.items() if not f.done()}
        idle = [s for s in sites if s.name not in self._busy]
        roster = [s.name for s in idle]
        history = self._history

        def message_for(site: SiteConnection) -> dict[str, Any]:
            out = {**with_catch_up(message, history, self._seen, site.name), "roster": roster}
            if site.name not in self._answered:
                out["inbox"] = self.server.inbox(site.name).to_str()
            return out

        pool = ThreadPoolExecutor(max_workers=max(1, len(idle)))
        futures = {s.name: pool.submit(s.call, action, message_for(s)) for s in idle}
        pool.shutdown(wait=False)
        for site in idle:
            self._seen[site.name] = len(history)
        index = slot_index(self.spec, action, rnd)

        slots: dict[str, int | None] = {}  # each answer's slot, read once

        def full() -> bool:  # K answers, at least min_sites of them fresh
            if not fit or self.buffer_k is None:
                return False
            for name, f in futures.items():
                if f.done() and f.exception() is None and name not in slots:
                    slots[name] = _slot_of(f.result())
            fresh = sum(slot == index for slot in slots.values())
            return len(slots) >= self.buffer_k and fresh >= self.spec.min_sites

        wait_until(futures, full, self.timeout)
        replies: dict[str, dict[str, Any] | Exception] = {}
        self.last_skipped = {}
        for name, future in futures.items():
            if future.done():
                exc = future.exception()
                replies[name] = exc if isinstance(exc, Exception) else future.result()
            else:
                self._busy[name] = future
                replies[name] = RoundTimeout(f"site {name!r} was still computing when the "
                                             "round's buffer filled (its mask key of the round "
                                             "is revealed; its update joins a later round)")
            if isinstance(replies[name], Exception):
                self.last_skipped[name] = f"left out of this round: {replies[name]}"
            else:
                self._answered.add(name)
        released = self._release(replies)
        try:
            self._evidence = self._collect(action, rnd, idle, replies, roster)
        except TooFewSitesError:
            self._unreturned += released
            raise
        self._history.append(self._evidence)
        self._pending = (action, rnd)
        inputs = [SignedContribution.from_str(m) for m in self._evidence["inputs"]]
        self.last_staleness = {c.site_id: index - c.round for c in inputs} if fit else {}
        return released

    def call_sites(self, sites: list[SiteConnection], action: str, message: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
        """A call outside the sums (evaluation): in a buffered job each site first catches
        up on the sums it missed (a site still computing is waited for); otherwise the
        sites still in the session, as they are."""
        if self.spec.async_k is None:
            members = [s for s in sites if s.name not in self.left_out(sites)]
            return dict(zip([s.name for s in members], call_all(members, action, message),
                            strict=True))
        replies, self._busy = call_caught_up(
            sites, action, lambda s: with_catch_up(message, self._history, self._seen, s.name),
            self._busy, self.timeout)
        self.last_skipped = {n: "still computing an earlier call" for n in self._busy}
        return replies

    def _collect(self, action: str, rnd: int, active: list[SiteConnection],
                 replies: dict[str, dict[str, Any] | Exception],
                 roster: list[str] | None = None) -> dict[str, Any]:
        """Add the masked vectors; if sites dropped, have the survivors reveal their keys.
        Returns the round's evidence for the sites."""
        r = session_round(self.spec, action, rnd)
        signed = [rep["masked"] for rep in replies.values() if not isinstance(rep, Exception)]
        self.sent = sent_by([rep for rep in replies.values()
                             if not isinstance(rep, Exception)], "masked")
        masked = [_signed_payload(m) for m in signed]
        ok = [rep for rep in replies.values() if not isinstance(rep, Exception)]
        evidence = {"kind": "secagg", "action": action, "round": rnd, "inputs": signed,
                    "recovery": [], "heads": _heads(ok)}
        if len(masked) < self.spec.min_sites:
            raise TooFewSitesError(
                f"secure sum of {action!r}: {len(masked)} sites answered, the job needs at "
                f"least {self.spec.min_sites}; failures: {self.dropped}")
        try:
            request = self.server.collect_masked(r, masked, roster)
        except SecAggError as exc:
            raise TooFewSitesError(f"secure sum of {action!r}: {exc}; failures: "
                                   f"{self.dropped}") from None
        if request is None:
            return evidence
        survivors = [s for s in active if s.name in request.survivors]
        answers = call_each(survivors, "secagg_recover", lambda _s: {"request": request.to_str()})
        revealed = [a["recovery"] for a in answers.values() if not isinstance(a, Exception)]
        try:
            self.server.recover(r, revealed)
        except SecAggError as exc:
            failures = {k: str(v) for k, v in answers.items() if isinstance(v, Exception)}
            raise TooFewSitesError(f"secure sum of {action!r}: recovery of the sites that "
                                   f"dropped failed: {exc}; failures: {failures}") from None
        evidence["inputs"] = [m for m in signed
                              if SignedContribution.from_str(m).site_id in request.survivors]
        evidence["recovery"] = revealed
        return evidence

    def session_state(self) -> dict[str, Any]:
        """The session's public state (keys, relayed ciphertexts, survivors, the pending
        masked sum) with the round awaiting opening: nothing a site's secret is in."""
        state = {"server": self.server.export_state(), "ready": self._ready,
                 "pending": list(self._pending) if self._pending else None,
                 "dropped": dict(self.dropped)}
        if self.spec.async_k is not None:  # what a site catches up on (public evidence)
            state |= {"history": self._history, "seen": dict(self._seen),
                      "answered": sorted(self._answered)}
        return state

    def left_out(self, sites: list[SiteConnection]) -> set[str]:
        """The sites out of the session for good (dropped in an earlier round and
        recovered): they hold an older model and take no further call."""
        if not self._ready:
            return set()
        return {s.name for s in sites if s.name not in self.server.active}

    @property
    def pending(self) -> tuple[str, int] | None:
        """The (action, round) collected but not opened yet (the sites open it next call)."""
        return self._pending

    def restore(self, evidence: dict[str, Any] | None,
                session: dict[str, Any] | None = None) -> None:
        """Continue the session of a checkpoint; the sites keep their side in their own
        directories, so the next call opens the pending sum as if nothing had happened."""
        if session is None:
            raise ValueError("this checkpoint holds no secure-sum session; start a new job")
        try:
            server = SecAggSessionServer.from_state(str(session["server"]))
            pending = session.get("pending")
            self._pending = (str(pending[0]), int(pending[1])) if pending else None
            self._ready = bool(session["ready"])
            self.dropped = {str(k): str(v) for k, v in dict(session["dropped"]).items()}
            self._history = [dict(e) for e in session.get("history") or []]
            self._seen = {str(k): int(v) for k, v in dict(session.get("seen") or {}).items()}
            self._answered = {str(n) for n in session.get("answered") or []}
        except (KeyError, TypeError, ValueError, IndexError, SecAggError) as exc:
            raise ValueError(f"the checkpoint's secure-sum session is unreadable: {exc}"
                             ) from None
        if server.job_id != self.spec.job_id:
            raise ValueError(f"the checkpoint's secure-sum session is of job {server.job_id!r}")
        self.server, self._evidence, self._unreturned = server, evidence, []

    def finish(self, sites: list[SiteConnection]) -> list[Released]:
        """Have the last round's survivors open its sum (one call each)."""
        released, self._unreturned = self._unreturned, []
        previous = self._evidence if self._pending is not None else None
        if previous is None:
            return released
        survivors = [s for s in sites if s.name in self.server.survivors]
        replies = call_each(survivors, "secagg_reveal", lambda _s: {"previous": previous})
        out = self._release(replies)
        if not out:
            failures = {k: str(v) for k, v in replies.items()}
            raise TooFewSitesError(f"no site opened the last secure sum: {failures}")
        return released + out
