"""Multi-round secure sum with ONE call per site per round (after Bonawitz et al., CCS 2017).

A training job sums once per round, and each PySyft call costs ~0.5 s per site. The original
protocol needs a second call per round (survivors reveal shares of the self-mask seeds, after
the server has fixed who survived). Here the *sites* remove the self-masks instead, with the
next round's call, so a round costs one call: the same count as plain FedAvg.

Setup (2 calls per site, once per job)
  advertise()       one X25519 pair c (encrypts site-to-site shares) and, for every round
                    r = 1..R, an X25519 pair s_r (agrees round-r pairwise mask seeds).
  share(directory)  Shamir-share every s_sk_{u,r} (threshold t, pycryptodome GF(2^128), see
                    `secagg._split32`) and draw a 32-byte federation-key contribution k_u.
                    Recipient v gets ONE AES-256-GCM ciphertext holding k_u and its shares
                    for all R rounds, key HKDF(X25519(c_sk_u, c_pk_v)), associated data = job,
                    sender, recipient and the key directory's digest (sites shown different
                    directories cannot read each other).
  The server relays the ciphertexts unread; each site opens its inbox with its first masked
  input and derives the federation key K = HKDF(k_1 | ... | k_n), which every member holds
  and the orchestrator never sees.

Round r (1 call per site)
  open_sum(Y_{r-1})   the site removes the self-masks from the previous round's masked sum:
                      Y - sum_{s in S} PRG(HKDF(K, r-1, s)) = sum of S's inputs, where S is
                      the survivor set the server fixed; returns it (an aggregate) and uses it
                      itself, e.g. to form the global model it trains from.
  masked_input(r, x)  y = x + PRG(HKDF(K, r, u)) + sum_{v in P, u<v} PRG(s_uv,r)
                      - sum_{v in P, u>v} PRG(s_uv,r) mod 2^bits, with
                      s_uv,r = HKDF(X25519(s_sk_{u,r}, s_pk_{v,r}), job|r|pair), P the site's
                      active peers. The server adds the y's: pairwise masks cancel, the
                      self-masks stay, so it holds Y_r and cannot read it.
  reveal = open_sum without a new round: after the last round (or an early stop).

Dropouts (an extra call, only in a round where a site stopped answering)
  recover(request)    survivors reveal their shares of s_sk_{v,r} of the sites v that dropped
                      in round r; the server rebuilds those keys and removes the dropped
                      sites' pairwise masks from Y_r. A site answers one recovery per round
                      and afterwards opens round r only with exactly that survivor set.
  A dropped site stays dropped for the job (its round-r key was revealed). Up to n - t sites
  may drop; with more, the round fails with SecAggThresholdError.

Buffered rounds (``buffered=True``, FedBuff under a secure sum)
  A round's sum is whoever answered first. The orchestrator names each round's *roster*,
  the sites it calls in that round; each site masks with the roster's other members only
  (at least ``min_survivors`` of them, itself included), so a site still computing an
  earlier round is no peer and costs no recovery. A roster member that does not answer is
  recovered as above, but only for that round: its round-r key exposes round r alone, so it
  masks again in a later round (its late round-r input then hides behind its self-mask
  only; see the threat model). A site may open a round it did not add to (it was still
  computing): it catches up on the others' sum, which holds nothing of its own.

Why per-round keys: once v drops in round r the server learns s_sk_{v,r}; with a long-term
key it could recompute every pairwise mask v ever used. Per-round keys expose round r only.

Why self-masks: a site declared dropped whose input arrives late (or whose reply the
server kept) still hides it: the server rebuilt its pairwise masks but not its self-mask.

Threat model: semi-honest orchestrator. It learns each round's sum of >= t sites (the
survivors) and who dropped. Unlike the original protocol, whose self-mask seeds are
Shamir-shared, every member holds K: a member colluding with the orchestrator can strip
self-masks, which matters only for a site declared dropped in a round whose input the
orchestrator nevertheless holds; pairwise masks still protect every other input against
the orchestrator and t-1 colluding sites. No signatures on the survivor set (no
ConsistencyCheck round): a malicious orchestrator can show different sets to different
sites, and the difference of two openings of one round is one site's input
(tests/attacks/test_buffered_secagg_attacks.py, docs/plan_consistent_survivor_sets.md).
Exported client state holds secret keys and K: keep it at the site.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.secagg import (
    _KEY,
    _NONCE,
    PROTOCOL,
    SecAggDecryptionError,
    SecAggError,
    SecAggLengthError,
    SecAggMessageError,
    SecAggModulusError,
    SecAggProtocolError,
    SecAggReconstructionError,
    SecAggSignatureError,
    SecAggThresholdError,
    SecAggUnknownSenderError,
    SecAggUnmaskRefusedError,
    SignFn,
    VerifyFn,
    _as_residues,
    _b64d,
    _b64e,
    _check_params,
    _combine32,
    _exchange,
    _hkdf,
    _is_str_list,
    _is_str_map,
    _label,
    _mask,
    _Message,
    _pack,
    _prg_u64,
    _pub,
    _split32,
    _too_few,
    _unpack,
    _want,
    collect_messages,
)

MAX_ROUNDS = 65535  # the round count travels as a 16-bit field in the share plaintext
_HEADER = struct.Struct(">HH")  # share plaintext: recipient index, rounds


class SecAggRoundError(SecAggProtocolError):
    """A round number outside 1..R, or a round older than one already masked/collected."""


# ---------------------------------------------------------------- primitives (session labels)


def _check_rounds(rounds: Any) -> None:
    if type(rounds) is not int or not 1 <= rounds <= MAX_ROUNDS:
        raise SecAggRoundError(f"rounds must be an integer in 1..{MAX_ROUNDS}, got {rounds!r}")


def _round_bits(round_bits: Any, bits: int, rounds: int) -> list[int] | None:
    """Per-round moduli: round r sums mod 2^round_bits[r-1] (at most the session's bits).

    A job's phases need different widths (a training round of 16-bit values, a statistics
    round of 52-bit sums); masking each round mod its own 2^b keeps the one-time pad exact
    (the masks are uniform mod 2^b) and sends ceil(b/8) bytes per value instead of the
    widest phase's. Every party derives the widths itself (from the approved job)."""
    if round_bits is None:
        return None
    out = list(round_bits)
    if len(out) != rounds or any(type(b) is not int or not 1 <= b <= bits for b in out):
        raise SecAggModulusError(f"round_bits must be {rounds} integers in 1..{bits}, got "
                                 f"{round_bits!r}")
    return out


def _pair_seed(s_sk: X25519PrivateKey, peer_pk: bytes, job_id: str, r: int,
               a: str, b: str) -> bytes:
    """Round-r seed of sites a (owner of s_sk) and b (owner of peer_pk), symmetric in a, b."""
    lo, hi = sorted((a, b))
    return _hkdf(_exchange(s_sk, peer_pk, b), _label("session-pair-mask", job_id, str(r), lo, hi))


def _self_seed(group_key: bytes, job_id: str, r: int, site: str) -> bytes:
    return _hkdf(group_key, _label("session-self-mask", job_id, str(r), site))


def _group_key(contributions: list[bytes], job_id: str, dir_digest: str) -> bytes:
    """The federation key: every member's contribution, in site order, bound to the job."""
    return _hkdf(b"".join(contributions), _label("session-group-key", job_id, dir_digest))


def _self_masks(group_key: bytes, job_id: str, r: int, sites: Iterable[str],
                length: int) -> np.ndarray:
    total = np.zeros(length, dtype=np.uint64)
    for s in sites:
        total += _prg_u64(_self_seed(group_key, job_id, r, s), length)
    return total


def _enc_key(c_sk: X25519PrivateKey, peer_c_pk: bytes, peer: str, job_id: str,
             sender: str, recipient: str) -> bytes:
    return _hkdf(_exchange(c_sk, peer_c_pk, peer),
                 _label("session-share-enc", job_id, sender, recipient))


def _enc_aad(job_id: str, sender: str, recipient: str, dir_digest: str) -> bytes:
    return _label("session-shares", job_id, sender, recipient, dir_digest)


def session_key_advert_payload(job_id: str, site_id: str, rounds: int, c_pk: str,
                               s_pks: list[str]) -> bytes:
    """Bytes a site signs (e.g. Ed25519) to authenticate its session key advertisement."""
    return _label("session-advertise-keys", job_id, site_id, str(rounds), c_pk, *s_pks)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- messages


def _check_sender(msg: Any) -> None:
    _want(isinstance(msg.sender, str) and bool(msg.sender), msg.KIND, "bad sender")


def _check_round_field(msg: Any) -> None:
    _want(type(msg.round) is int and 1 <= msg.round <= MAX_ROUNDS, msg.KIND,
          "round must be a positive integer")


@dataclass(frozen=True)
class SessionAdvertiseKeys(_Message):
    """Setup, site -> server: c public key and one s public key per round (base64)."""

    KIND = "session_advertise_keys"
    job_id: str
    sender: str
    rounds: int
    c_pk: str
    s_pks: list[str]
    signature: str | None = None

    def check(self) -> None:
        super().check()
        _check_sender(self)
        _want(type(self.rounds) is int and 1 <= self.rounds <= MAX_ROUNDS, self.KIND,
              "rounds must be a positive integer")
        _b64d(self.c_pk, f"c_pk of site {self.sender!r}", _KEY)
        _want(_is_str_list(self.s_pks) and len(self.s_pks) == self.rounds, self.KIND,
              f"site {self.sender!r} must advertise one s_pk per round ({self.rounds})")
        for r, pk in enumerate(self.s_pks, start=1):
            _b64d(pk, f"round-{r} s_pk of site {self.sender!r}", _KEY)
        if self.signature is not None:
            _b64d(self.signature, f"signature of site {self.sender!r}")


@dataclass(frozen=True)
class SessionKeyDirectory(_Message):
    """Setup, server -> all: job parameters and every site's public keys."""

    KIND = "session_key_directory"
    job_id: str
    threshold: int
    bits: int
    vector_length: int
    rounds: int
    keys: dict[str, dict[str, Any]]

    def check(self) -> None:
        super().check()
        for name in ("threshold", "bits", "vector_length", "rounds"):
            _want(type(getattr(self, name)) is int, self.KIND, f"{name} must be an integer")
        _want(isinstance(self.keys, dict), self.KIND, "keys must be an object")
        for site, e in self.keys.items():
            _want(isinstance(e, dict) and {"c_pk", "s_pks", "signature"} == set(e), self.KIND,
                  f"entry of site {site!r} needs c_pk, s_pks, signature")
            _b64d(e["c_pk"], f"c_pk of site {site!r}", _KEY)
            _want(_is_str_list(e["s_pks"]) and len(e["s_pks"]) == self.rounds, self.KIND,
                  f"site {site!r} must have one s_pk per round ({self.rounds})")
            for pk in e["s_pks"]:
                _b64d(pk, f"s_pk of site {site!r}", _KEY)
            _want(e["signature"] is None or isinstance(e["signature"], str), self.KIND,
                  f"signature of site {site!r} must be a string or null")


@dataclass(frozen=True)
class SessionShares(_Message):
    """Setup, site -> server: one AES-GCM blob per recipient (key shares + K contribution)."""

    KIND = "session_shares"
    job_id: str
    sender: str
    ciphertexts: dict[str, str]

    def check(self) -> None:
        super().check()
        _check_sender(self)
        _want(_is_str_map(self.ciphertexts), self.KIND, "ciphertexts must map site -> base64")


@dataclass(frozen=True)
class SessionInbox(_Message):
    """Server -> one site, with its first masked input: the ciphertexts addressed to it."""

    KIND = "session_inbox"
    job_id: str
    recipient: str
    senders: list[str]
    ciphertexts: dict[str, str]

    def check(self) -> None:
        super().check()
        _want(isinstance(self.recipient, str), self.KIND, "bad recipient")
        _want(_is_str_list(self.senders), self.KIND, "senders must be a list of site ids")
        _want(_is_str_map(self.ciphertexts), self.KIND, "ciphertexts must map site -> base64")


@dataclass(frozen=True)
class SessionMaskedInput(_Message):
    """Round r, site -> server: y packed as ceil(bits/8) bytes per value, and the peers P."""

    KIND = "session_masked_input"
    job_id: str
    sender: str
    round: int
    bits: int
    vector_length: int
    peers: list[str]
    data: str

    def check(self) -> None:
        super().check()
        _check_sender(self)
        _check_round_field(self)
        _want(type(self.bits) is int and 1 <= self.bits <= 64, self.KIND, "bits must be 1..64")
        _want(type(self.vector_length) is int, self.KIND, "vector_length must be an integer")
        _want(_is_str_list(self.peers), self.KIND, "peers must be a list of site ids")
        _want(isinstance(self.data, str), self.KIND, "data must be a base64 string")

    def values(self) -> np.ndarray:
        """The masked vector (uint64 residues mod 2^bits)."""
        return _unpack(self.data, self.bits, self.vector_length, self.sender)


@dataclass(frozen=True)
class SessionRecoverRequest(_Message):
    """Round r, server -> survivors: who survived, whose round-r mask keys to reveal."""

    KIND = "session_recover_request"
    job_id: str
    round: int
    survivors: list[str]
    dropped: list[str]

    def check(self) -> None:
        super().check()
        _check_round_field(self)
        _want(_is_str_list(self.survivors) and _is_str_list(self.dropped), self.KIND,
              "survivors and dropped must be lists of site ids")


@dataclass(frozen=True)
class SessionRecoverShares(_Message):
    """Round r, site -> server: its shares of s_sk_{v,r} of the sites v dropped in round r."""

    KIND = "session_recover_shares"
    job_id: str
    sender: str
    round: int
    sk_shares: dict[str, str]

    def check(self) -> None:
        super().check()
        _check_sender(self)
        _check_round_field(self)
        _want(_is_str_map(self.sk_shares), self.KIND, "sk_shares must map site -> base64")


@dataclass(frozen=True)
class SessionMaskedSum(_Message):
    """Server -> survivors, with the next call: round r's sum, still under the self-masks."""

    KIND = "session_masked_sum"
    job_id: str
    round: int
    survivors: list[str]
    bits: int
    vector_length: int
    data: str

    def check(self) -> None:
        super().check()
        _check_round_field(self)
        _want(_is_str_list(self.survivors), self.KIND, "survivors must be a list of site ids")
        _want(type(self.bits) is int and 1 <= self.bits <= 64, self.KIND, "bits must be 1..64")
        _want(type(self.vector_length) is int, self.KIND, "vector_length must be an integer")
        _want(isinstance(self.data, str), self.KIND, "data must be a base64 string")


@dataclass(frozen=True)
class SessionOpenedSum(_Message):
    """Site -> server: round r's sum over the survivors, self-masks removed."""

    KIND = "session_opened_sum"
    job_id: str
    sender: str
    round: int
    survivors: list[str]
    data: str

    def check(self) -> None:
        super().check()
        _check_sender(self)
        _check_round_field(self)
        _want(_is_str_list(self.survivors), self.KIND, "survivors must be a list of site ids")
        _want(isinstance(self.data, str), self.KIND, "data must be a base64 string")


def _state_error(what: str, exc: Exception) -> SecAggError:
    if isinstance(exc, SecAggError):
        return exc
    return SecAggMessageError(f"corrupt secure-aggregation session {what} state ({exc!r})")


# ---------------------------------------------------------------- client


def _remove_dropped_masks(total: np.ndarray, job_id: str, r: int, participants: list[str],
                          threshold: int, s_pks: dict[str, list[bytes]],
                          peers: dict[str, list[str]], dropped: list[str],
                          revealed: dict[str, SessionRecoverShares]) -> np.ndarray:
    """Remove from round r's sum the pairwise masks the survivors added with the dropped
    sites, rebuilding each dropped site's round-r key from ``threshold`` revealed shares and
    checking it against its public key (so forged shares are caught, not used).

    Shared by the server (which forms the masked sum) and every site (which forms it again
    from the signed inputs, so a server cannot hand it a made-up sum)."""
    index = {s: i + 1 for i, s in enumerate(participants)}
    chosen = sorted(revealed)[:threshold]
    n, rr = len(total), r - 1
    total = total.copy()
    for v in dropped:
        key = X25519PrivateKey.from_private_bytes(_combine32(
            [(index[w], _b64d(revealed[w].sk_shares[v], f"share from {w!r}", _KEY))
             for w in chosen]))
        if _pub(key) != s_pks[v][rr]:
            raise SecAggReconstructionError(
                f"round-{r} mask key of dropped site {v!r} rebuilt from {chosen} does not "
                "match its public key (corrupted shares)"
            )
        for u, u_peers in peers.items():  # u added +PRG(s_uv) if u < v else -PRG(s_uv)
            if v in u_peers:
                stream = _prg_u64(_pair_seed(key, s_pks[u][rr], job_id, r, v, u), n)
                if u < v:
                    total -= stream
                else:
                    total += stream
    return total


class SecAggSessionClient:
    """One site's side for a whole job. Call `export_state()` after every call and
    `from_state()` before the next one.

    Order: advertise -> share -> masked_input(1, inbox=...) -> for each later round
    [recover(r) only if a site dropped] -> open_sum(r) -> masked_input(r + 1) ... ->
    open_sum(last round).
    """

    def __init__(self, site_id: str, *, job_id: str, threshold: int, bits: int,
                 vector_length: int, rounds: int, min_survivors: int = 0,
                 round_bits: list[int] | None = None, buffered: bool = False) -> None:
        _check_params(threshold, bits, vector_length)
        _check_rounds(rounds)
        self.round_bits = _round_bits(round_bits, bits, rounds)
        self.buffered = bool(buffered)
        if not isinstance(site_id, str) or not site_id:
            raise SecAggMessageError(f"site_id must be a non-empty string, got {site_id!r}")
        if not isinstance(job_id, str):
            raise SecAggMessageError(f"job_id must be a string, got {job_id!r}")
        self.site_id, self.job_id = site_id, job_id
        self.threshold, self.bits, self.vector_length = threshold, bits, vector_length
        self.rounds = rounds
        self.min_survivors = max(threshold, int(min_survivors))
        self._c_sk = X25519PrivateKey.generate()
        self._s_sks = [X25519PrivateKey.generate() for _ in range(rounds)]
        self._k = secrets.token_bytes(_KEY)  # this site's contribution to K
        self._phase = "keys"  # keys -> shared -> ready (inbox opened, K known)
        self._dir_digest = ""
        self._share_msg = ""
        self._sites: list[str] = []  # every site of the job (directory == sharers)
        self._c_pks: dict[str, bytes] = {}
        self._s_pks: dict[str, list[bytes]] = {}
        self._own: list[bytes] = []  # own-index shares of own s_sk_r
        self._group_key = b""
        self._held: dict[str, list[bytes]] = {}  # sender -> its per-round key shares for me
        self._round = 0  # latest masked round
        self._input_digest = ""
        self._peers: list[str] = []  # peers masked with in self._round
        self._dropped: dict[str, int] = {}  # peer -> round this site learned it was dropped
        self._recovery: tuple[list[str], list[str]] | None = None  # (S, D) of self._round
        self._opened = 0  # latest round whose sum this site opened
        self._opened_digest = ""

    def bits_of(self, r: int) -> int:
        """The modulus exponent of round r (the session's, unless per-round widths)."""
        if self.round_bits is not None and type(r) is int and 1 <= r <= self.rounds:
            return self.round_bits[r - 1]
        return self.bits

    def _error_job(self, job_id: str, what: str) -> None:
        if job_id != self.job_id:
            raise SecAggMessageError(
                f"site {self.site_id!r}: {what} is for job {job_id!r}, not {self.job_id!r}"
            )

    @property
    def phase(self) -> str:
        """Setup progress: "keys" (advertised), "shared", "ready" (inbox opened)."""
        return self._phase

    @property
    def dropped(self) -> dict[str, int]:
        """Peers this site knows were dropped, with the round it learned it."""
        return dict(self._dropped)

    # -- setup
    def advertise(self, sign: SignFn | None = None) -> SessionAdvertiseKeys:
        """Public keys for the whole job; `sign(payload) -> signature` is optional."""
        c_pk = _b64e(_pub(self._c_sk))
        s_pks = [_b64e(_pub(k)) for k in self._s_sks]
        sig = None
        if sign is not None:
            payload = session_key_advert_payload(self.job_id, self.site_id, self.rounds,
                                                 c_pk, s_pks)
            sig = _b64e(sign(payload))
        return SessionAdvertiseKeys(self.job_id, self.site_id, self.rounds, c_pk, s_pks, sig)

    def share(self, directory: SessionKeyDirectory | str,
              verify: VerifyFn | None = None) -> SessionShares:
        """Shamir-share s_sk_{u,r} for every round and send k_u, one ciphertext per recipient."""
        d = SessionKeyDirectory.coerce(directory)
        digest = _digest(d.to_str())
        if self._phase != "keys":
            if digest == self._dir_digest:
                return SessionShares.from_str(self._share_msg)
            raise SecAggProtocolError(
                f"site {self.site_id!r} already shared its keys for job {self.job_id!r} "
                "under another key directory"
            )
        self._error_job(d.job_id, "key directory")
        params = (d.threshold, d.bits, d.vector_length, d.rounds)
        mine = (self.threshold, self.bits, self.vector_length, self.rounds)
        if params != mine:
            raise SecAggMessageError(
                f"site {self.site_id!r}: key directory says (threshold, bits, length, rounds)="
                f"{params}, this site was configured with {mine}"
            )
        if self.site_id not in d.keys:
            raise SecAggUnknownSenderError(f"key directory does not list site {self.site_id!r}")
        own = self.advertise()
        if (d.keys[self.site_id]["c_pk"], d.keys[self.site_id]["s_pks"]) != (own.c_pk, own.s_pks):
            raise SecAggMessageError(
                f"key directory lists other keys for site {self.site_id!r} (key substitution?)"
            )
        if len(d.keys) < self.min_survivors:
            raise SecAggThresholdError(
                f"key directory lists only {len(d.keys)} sites, a sum needs at least "
                f"{self.min_survivors} (threshold {self.threshold})"
            )
        if verify is not None:
            for site, e in d.keys.items():
                payload = session_key_advert_payload(d.job_id, site, d.rounds, e["c_pk"],
                                                     e["s_pks"])
                sig = e["signature"]
                if sig is None or not verify(site, payload, _b64d(sig, f"signature of {site!r}")):
                    raise SecAggSignatureError(f"key advertisement of site {site!r} is not "
                                               "signed or its signature does not verify")
        sites = sorted(d.keys)
        c_pks = {s: _b64d(d.keys[s]["c_pk"], "c_pk") for s in sites}
        s_pks = {s: [_b64d(pk, "s_pk") for pk in d.keys[s]["s_pks"]] for s in sites}
        n, me = len(sites), sites.index(self.site_id)
        sk_sh = [_split32(k.private_bytes_raw(), self.threshold, n) for k in self._s_sks]
        cts: dict[str, str] = {}
        for i, v in enumerate(sites):
            if v == self.site_id:
                continue
            plain = _HEADER.pack(i + 1, self.rounds) + self._k + b"".join(
                sk_sh[r][i] for r in range(self.rounds))
            key = _enc_key(self._c_sk, c_pks[v], v, self.job_id, self.site_id, v)
            nonce = secrets.token_bytes(_NONCE)
            aad = _enc_aad(self.job_id, self.site_id, v, digest)
            cts[v] = _b64e(nonce + AESGCM(key).encrypt(nonce, plain, aad))
        msg = SessionShares(self.job_id, self.site_id, cts)
        self._sites, self._c_pks, self._s_pks = sites, c_pks, s_pks
        self._own = [sk_sh[r][me] for r in range(self.rounds)]
        self._phase, self._dir_digest, self._share_msg = "shared", digest, msg.to_str()
        return msg

    def open_inbox(self, inbox: SessionInbox | str | None) -> None:
        """Open the shares inbox the first masked call carries, before that call computes
        anything (a missing or foreign inbox is refused while nothing is spent)."""
        if self._phase != "shared":
            raise SecAggProtocolError(f"site {self.site_id!r} has no shares inbox to open now "
                                      f"(setup phase {self._phase!r})")
        if inbox is None:
            raise SecAggProtocolError(
                f"site {self.site_id!r}: its first masked input needs its shares inbox")
        self._open_inbox(inbox)

    def _open_inbox(self, inbox: SessionInbox | str) -> None:
        """Authenticate and decrypt every sender's blob; derive K; keep the key shares."""
        box = SessionInbox.coerce(inbox)
        me = self.site_id
        self._error_job(box.job_id, "shares inbox")
        if box.recipient != me:
            raise SecAggMessageError(f"shares inbox for site {box.recipient!r} delivered to {me!r}")
        others = [v for v in self._sites if v != me]
        if sorted(box.senders) != self._sites or sorted(box.ciphertexts) != others:
            raise SecAggMessageError(
                f"site {me!r}: shares inbox holds ciphertexts from {sorted(box.ciphertexts)}, "
                f"the job's other sites are {others}"
            )
        index = self._sites.index(me) + 1
        size = _HEADER.size + _KEY + _KEY * self.rounds
        contributions: dict[str, bytes] = {me: self._k}
        held: dict[str, list[bytes]] = {}
        for v in others:
            raw = _b64d(box.ciphertexts[v], f"ciphertext from site {v!r}")
            key = _enc_key(self._c_sk, self._c_pks[v], v, self.job_id, v, me)
            try:
                plain = AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:],
                                            _enc_aad(self.job_id, v, me, self._dir_digest))
            except (InvalidTag, ValueError):
                raise SecAggDecryptionError(
                    f"site {me!r}: shares relayed from site {v!r} failed AES-GCM authentication "
                    "(tampered, misrouted, another job or another key directory)"
                ) from None
            if len(plain) != size or _HEADER.unpack_from(plain) != (index, self.rounds):
                raise SecAggMessageError(
                    f"site {me!r}: shares from {v!r} are not for index {index} x "
                    f"{self.rounds} rounds"
                )
            body = plain[_HEADER.size:]
            contributions[v] = body[:_KEY]
            held[v] = [body[_KEY * (i + 1):_KEY * (i + 2)] for i in range(self.rounds)]
        held[me] = list(self._own)
        self._group_key = _group_key([contributions[s] for s in self._sites], self.job_id,
                                     self._dir_digest)
        self._held, self._phase = held, "ready"

    # -- round r
    def peers_for(self, roster: Any = None) -> list[str]:
        """The peers a new round masks with: every active site, or in a buffered session
        the ``roster`` the orchestrator called, less this site; refused below
        ``min_survivors`` sites (callable before the round's input exists)."""
        me = self.site_id
        if not self.buffered:
            if roster is not None:
                raise SecAggProtocolError(f"site {me!r}: job {self.job_id!r} masks with every "
                                          "active site; it takes no roster")
            peers = [v for v in self._sites if v != me and v not in self._dropped]
        else:
            if not _is_str_list(roster) or len(set(roster)) != len(roster):
                raise SecAggMessageError(f"site {me!r}: a buffered round needs a roster of "
                                         f"distinct site ids, got {roster!r}")
            strangers = sorted(set(roster) - set(self._sites)) if self._sites else []
            if strangers or me not in roster:
                raise SecAggUnknownSenderError(
                    f"site {me!r}: the roster {sorted(roster)} must list this site and "
                    f"members only (strangers: {strangers})")
            peers = sorted(v for v in roster if v != me)
        if len(peers) + 1 < self.min_survivors:
            raise SecAggThresholdError(
                f"site {me!r}: only {len(peers) + 1} sites would mask this round together, "
                f"a sum needs at least {self.min_survivors}")
        return peers

    def masked_input(self, r: int, x: np.ndarray,
                     inbox: SessionInbox | str | None = None,
                     roster: list[str] | None = None) -> SessionMaskedInput:
        """Mask x for round r with its self-mask and round-r pairwise seeds over the active
        peers (a buffered session: over ``roster``, the sites called in round r). The first
        call needs the site's `inbox` (it carries K's contributions)."""
        if self._phase == "keys":
            raise SecAggProtocolError(f"site {self.site_id!r}: masked_input before share")
        if self._phase == "shared":
            self.open_inbox(inbox)
        if type(r) is not int or not 1 <= r <= self.rounds:
            raise SecAggRoundError(
                f"site {self.site_id!r}: round {r!r} is outside 1..{self.rounds} of job "
                f"{self.job_id!r}"
            )
        bits = self.bits_of(r)
        xs = _as_residues(x, bits, self.vector_length, self.site_id)
        digest = hashlib.sha256(xs.astype("<u8").tobytes()).hexdigest()
        if r < self._round:
            raise SecAggRoundError(
                f"site {self.site_id!r}: round {r} is over, already masked round {self._round} "
                "(rounds must strictly increase)"
            )
        if r == self._round:
            if digest != self._input_digest:
                raise SecAggProtocolError(
                    f"site {self.site_id!r} already sent a masked input for round {r}; masking "
                    "another input under the same masks would leak the difference"
                )
            peers = self._peers  # identical retry: identical message
        else:
            peers = self.peers_for(roster)
        n, me = self.vector_length, self.site_id
        acc = xs.copy()
        acc += _prg_u64(_self_seed(self._group_key, self.job_id, r, me), n)
        s_sk = self._s_sks[r - 1]
        for v in peers:
            stream = _prg_u64(_pair_seed(s_sk, self._s_pks[v][r - 1], self.job_id, r, me, v), n)
            if me < v:
                acc += stream
            else:
                acc -= stream
        acc &= _mask(bits)
        if r != self._round:
            self._round, self._input_digest, self._peers = r, digest, peers
            self._recovery = None
        return SessionMaskedInput(self.job_id, me, r, bits, n, list(peers), _pack(acc, bits))

    def _check_survivors(self, r: int, survivors: list[str], what: str) -> set[str]:
        me = self.site_id
        if self._phase != "ready" or self._round != r:
            raise SecAggRoundError(
                f"site {me!r} did not mask round {r} (latest masked round: "
                f"{self._round or 'none'}), so it {what} nothing for it"
            )
        surv = set(survivors)
        unknown = sorted(surv - set(self._sites))
        if unknown:
            raise SecAggUnknownSenderError(
                f"site {me!r}: round-{r} survivors {unknown} are not in this job")
        if me not in surv:
            raise SecAggProtocolError(
                f"site {me!r} is not listed as a survivor of round {r} but was asked to "
                f"{what.rstrip('s')} for it")
        strangers = sorted(surv - set(self._peers) - {me})
        if strangers:
            raise SecAggUnmaskRefusedError(
                f"site {me!r} refuses round {r}: survivors {strangers} were not its peers in "
                "that round (dropped earlier, or never masked with it)")
        if len(surv) < self.min_survivors:
            raise SecAggThresholdError(
                f"site {me!r}: round {r} lists only {len(surv)} survivors {sorted(surv)}, a "
                f"sum needs at least {self.min_survivors}"
            )
        return surv

    def recover(self, request: SessionRecoverRequest | str) -> SessionRecoverShares:
        """Reveal round-r key shares of the sites dropped in round r (once per round)."""
        req = SessionRecoverRequest.coerce(request)
        self._error_job(req.job_id, "recovery request")
        r, me = req.round, self.site_id
        if r <= self._opened:
            raise SecAggUnmaskRefusedError(
                f"site {me!r} already opened the sum of round {r}; its survivors are final")
        surv = self._check_survivors(r, req.survivors, "reveals")
        drop = set(req.dropped)
        if not drop or drop & surv or drop | surv != set(self._peers) | {me}:
            raise SecAggMessageError(
                f"site {me!r}: round-{r} recovery must split its peers {self._peers} into "
                f"survivors and dropped; got survivors {sorted(surv)}, dropped {sorted(drop)}"
            )
        key = (sorted(surv), sorted(drop))
        if self._recovery is not None and self._recovery != key:
            raise SecAggUnmaskRefusedError(
                f"site {me!r} refuses round {r}: it already revealed keys for dropped "
                f"{self._recovery[1]} (survivors {self._recovery[0]}); a second, different "
                "split would unmask an input"
            )
        self._recovery = key
        for v in drop:
            self._dropped.setdefault(v, r)
        return SessionRecoverShares(self.job_id, me, r,
                                    {v: _b64e(self._held[v][r - 1]) for v in sorted(drop)})

    def open_sum(self, masked_sum: SessionMaskedSum | str) -> SessionOpenedSum:
        """Remove the survivors' self-masks from round r's masked sum: the sum of their
        inputs, for this site's own use and to return. Once per round, for one survivor set."""
        msg = SessionMaskedSum.coerce(masked_sum)
        self._error_job(msg.job_id, "masked sum")
        r, me = msg.round, self.site_id
        digest = _digest(msg.to_str())
        retry = r == self._opened and digest == self._opened_digest  # same answer again
        if r <= self._opened and not retry:
            raise SecAggUnmaskRefusedError(
                f"site {me!r} already opened the sum of round {r} (another masked sum or "
                "survivor set would reveal a difference of inputs)")
        bits = self.bits_of(r)
        if (msg.bits, msg.vector_length) != (bits, self.vector_length):
            raise SecAggModulusError(
                f"site {me!r}: masked sum is {msg.vector_length} values mod 2^{msg.bits}, this "
                f"job sums {self.vector_length} values mod 2^{bits} in round {r}")
        surv = set(msg.survivors)
        if not retry and self._catching_up(r, surv):
            pass  # a buffered round this site did not add to: the others' sum
        elif not retry:
            surv = self._check_survivors(r, msg.survivors, "opens")
            if self._recovery is not None and sorted(surv) != self._recovery[0]:
                raise SecAggUnmaskRefusedError(
                    f"site {me!r} refuses round {r}: it revealed keys for survivors "
                    f"{self._recovery[0]}, the masked sum claims {sorted(surv)}")
            for v in set(self._peers) - surv:  # their masks were removed by a recovery
                self._dropped.setdefault(v, r)
        total = _unpack(msg.data, bits, self.vector_length, "the masked sum")
        total -= _self_masks(self._group_key, self.job_id, r, sorted(surv), self.vector_length)
        total &= _mask(bits)
        self._opened, self._opened_digest = r, digest
        return SessionOpenedSum(self.job_id, me, r, sorted(surv), _pack(total, bits))

    def _catching_up(self, r: int, survivors: set[str]) -> bool:
        """Whether round r's sum is one a buffered site opens without having added to it
        (it was still computing, or its input came too late and its round key was
        recovered): a sum of at least ``min_survivors`` members, none of it this site's."""
        if not self.buffered or (self.site_id in survivors and self._round == r):
            return False
        if self.site_id in survivors:
            raise SecAggUnmaskRefusedError(f"site {self.site_id!r} did not mask round {r}, "
                                           "yet the masked sum lists it as a survivor")
        if self._round == r and self._recovery is not None:
            raise SecAggUnmaskRefusedError(
                f"site {self.site_id!r} refuses round {r}: it revealed keys as one of its "
                f"survivors {self._recovery[0]}, the masked sum leaves it out")
        unknown = sorted(survivors - set(self._sites))
        if unknown:
            raise SecAggUnknownSenderError(
                f"site {self.site_id!r}: round-{r} survivors {unknown} are not in this job")
        if len(survivors) < self.min_survivors:
            raise SecAggThresholdError(
                f"site {self.site_id!r}: round {r} lists only {len(survivors)} survivors, a "
                f"sum needs at least {self.min_survivors}")
        return True

    def open_round(self, inputs: Iterable[SessionMaskedInput | str],
                   recoveries: Iterable[SessionRecoverShares | str] = ()) -> SessionOpenedSum:
        """Form round r's masked sum *itself* from the survivors' masked inputs (and, if
        sites dropped, the revealed shares of their round keys), then open it.

        The orchestrator only relays: a sum it altered, a survivor it left out without a
        recovery, or a forged share is refused instead of being trained on. (Whether each
        input really comes from its sender is checked by the caller's signatures.)"""
        got: dict[str, SessionMaskedInput] = {}
        for raw in inputs:
            msg = SessionMaskedInput.coerce(raw)
            self._error_job(msg.job_id, "masked input")
            if msg.sender not in self._sites or msg.sender in got:
                raise SecAggUnknownSenderError(
                    f"site {self.site_id!r}: masked input from {msg.sender!r} is unknown or "
                    "repeated")
            got[msg.sender] = msg
        rounds = {m.round for m in got.values()}
        if len(rounds) != 1:
            raise SecAggMessageError(f"site {self.site_id!r}: masked inputs of rounds "
                                     f"{sorted(rounds)} cannot form one sum")
        r = rounds.pop()
        bits = self.bits_of(r)
        if any((m.bits, m.vector_length) != (bits, self.vector_length)
               for m in got.values()):
            raise SecAggModulusError(f"site {self.site_id!r}: a masked input does not sum "
                                     f"{self.vector_length} values mod 2^{bits}")
        survivors = sorted(got)
        peers = {u: list(got[u].peers) for u in survivors}
        rosters = {frozenset([u, *p]) for u, p in peers.items()}
        if self.buffered and len(rosters) != 1:
            raise SecAggMessageError(f"site {self.site_id!r}: the round-{r} inputs were masked "
                                     "over different rosters (sites shown different rounds)")
        dropped = sorted(set().union(*map(set, peers.values())) - set(survivors))
        total = np.zeros(self.vector_length, dtype=np.uint64)
        for m in got.values():
            total += m.values()
        if dropped:
            revealed = {}
            for raw in recoveries:
                rec = SessionRecoverShares.coerce(raw)
                if (rec.job_id == self.job_id and rec.round == r and rec.sender in got
                        and set(rec.sk_shares) == set(dropped)):
                    revealed[rec.sender] = rec
            if len(revealed) < self.threshold:
                raise SecAggThresholdError(
                    f"site {self.site_id!r}: round {r} dropped {dropped} but only "
                    f"{len(revealed)} survivors revealed their keys, {self.threshold} needed")
            total = _remove_dropped_masks(total, self.job_id, r, self._sites, self.threshold,
                                          self._s_pks, peers, dropped, revealed)
        return self.open_sum(SessionMaskedSum(self.job_id, r, survivors, bits,
                                              self.vector_length,
                                              _pack(total & _mask(bits), bits)))

    def opened_values(self, opened: SessionOpenedSum) -> np.ndarray:
        """The residues of an opened sum (for the site's own use of the aggregate)."""
        return _unpack(opened.data, self.bits_of(opened.round), self.vector_length,
                       "the opened sum")

    # -- state
    def export_state(self) -> str:
        """All client state as JSON (holds secret keys: keep it at the site, never relay it)."""
        return json.dumps({
            "kind": "secagg_session_client_state", "protocol": PROTOCOL,
            "site_id": self.site_id, "job_id": self.job_id, "threshold": self.threshold,
            "bits": self.bits, "vector_length": self.vector_length, "rounds": self.rounds,
            "round_bits": self.round_bits, "buffered": self.buffered,
            "min_survivors": self.min_survivors, "phase": self._phase,
            "c_sk": _b64e(self._c_sk.private_bytes_raw()),
            "s_sks": [_b64e(k.private_bytes_raw()) for k in self._s_sks],
            "k": _b64e(self._k), "group_key": _b64e(self._group_key),
            "dir_digest": self._dir_digest, "share_msg": self._share_msg, "sites": self._sites,
            "c_pks": {s: _b64e(k) for s, k in self._c_pks.items()},
            "s_pks": {s: [_b64e(k) for k in ks] for s, ks in self._s_pks.items()},
            "own": [_b64e(k) for k in self._own],
            "held": {s: [_b64e(k) for k in ks] for s, ks in self._held.items()},
            "round": self._round, "input_digest": self._input_digest, "peers": self._peers,
            "dropped": self._dropped,
            "recovery": list(self._recovery) if self._recovery else None,
            "opened": self._opened, "opened_digest": self._opened_digest,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_state(cls, state: str) -> SecAggSessionClient:
        """Resume a client from `export_state()` output."""
        try:
            st = json.loads(state)
            if st.get("kind") != "secagg_session_client_state" or st.get("protocol") != PROTOCOL:
                raise SecAggMessageError(f"not a {PROTOCOL} session client state")
            c = cls.__new__(cls)
            c.site_id, c.job_id = st["site_id"], st["job_id"]
            c.threshold, c.bits, c.vector_length = st["threshold"], st["bits"], st["vector_length"]
            c.rounds, c.min_survivors = st["rounds"], int(st["min_survivors"])
            _check_params(c.threshold, c.bits, c.vector_length)
            _check_rounds(c.rounds)
            c.round_bits = _round_bits(st.get("round_bits"), c.bits, c.rounds)
            c.buffered = bool(st.get("buffered", False))
            c._phase = st["phase"]
            key = X25519PrivateKey.from_private_bytes
            c._c_sk = key(_b64d(st["c_sk"], "c_sk", _KEY))
            c._s_sks = [key(_b64d(k, "s_sk", _KEY)) for k in st["s_sks"]]
            if len(c._s_sks) != c.rounds:
                raise SecAggMessageError("session client state: key count != rounds")
            c._k = _b64d(st["k"], "k", _KEY)
            c._group_key = _b64d(st["group_key"], "group key")
            c._dir_digest, c._share_msg = st["dir_digest"], st["share_msg"]
            c._sites = list(st["sites"])
            c._c_pks = {s: _b64d(k, "c_pk", _KEY) for s, k in st["c_pks"].items()}
            c._s_pks = {s: [_b64d(k, "s_pk", _KEY) for k in ks] for s, ks in st["s_pks"].items()}
            c._own = [_b64d(k, "own share", _KEY) for k in st["own"]]
            c._held = {s: [_b64d(k, "held share", _KEY) for k in ks]
                       for s, ks in st["held"].items()}
            c._round, c._input_digest = int(st["round"]), st["input_digest"]
            c._peers = list(st["peers"])
            c._dropped = {str(s): int(r) for s, r in st["dropped"].items()}
            rec = st["recovery"]
            c._recovery = (list(rec[0]), list(rec[1])) if rec else None
            c._opened, c._opened_digest = int(st["opened"]), st["opened_digest"]
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise _state_error("client", exc) from None
        return c


# ---------------------------------------------------------------- server


class SecAggSessionServer:
    """Orchestrator side for a whole job: relays ciphertexts it cannot read, adds masked
    inputs, removes dropped sites' pairwise masks, and checks the sums the sites open.

    Per round it learns the sum of that round's survivors (as the sites open it) and who
    dropped out; never a single site's input.
    """

    def __init__(self, threshold: int, bits: int, vector_length: int, job_id: str,
                 rounds: int, *, sites: Iterable[str] | None = None,
                 min_survivors: int = 0, round_bits: list[int] | None = None,
                 buffered: bool = False) -> None:
        _check_params(threshold, bits, vector_length)
        _check_rounds(rounds)
        self.round_bits = _round_bits(round_bits, bits, rounds)
        self.buffered = bool(buffered)
        if not isinstance(job_id, str):
            raise SecAggMessageError(f"job_id must be a string, got {job_id!r}")
        self.threshold, self.bits, self.vector_length = threshold, bits, vector_length
        self.job_id, self.rounds = job_id, rounds
        self.min_survivors = max(threshold, int(min_survivors))
        self.sites = sorted(sites) if sites is not None else None
        self._c_pks: dict[str, bytes] = {}
        self._s_pks: dict[str, list[bytes]] = {}
        self._inboxes: dict[str, str] = {}
        self._dropped: dict[str, int] = {}  # site -> round its mask key was revealed
        self._round = 0  # latest collected round
        self._survivors: list[str] = []
        self._round_dropped: list[str] = []  # awaiting recovery in self._round
        self._peers: dict[str, list[str]] = {}
        self._sum = ""  # packed sum of self._round's masked inputs

    def bits_of(self, r: int) -> int:
        """The modulus exponent of round r (the session's, unless per-round widths)."""
        if self.round_bits is not None and type(r) is int and 1 <= r <= self.rounds:
            return self.round_bits[r - 1]
        return self.bits

    @property
    def participants(self) -> list[str]:
        """Every site that completed setup."""
        return sorted(self._inboxes)

    @property
    def active(self) -> list[str]:
        """Sites still in the job: the orchestrator asks these for masked inputs."""
        return [s for s in self.participants if s not in self._dropped]

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped sites -> round in which their mask key was revealed."""
        return dict(self._dropped)

    @property
    def round(self) -> int:
        """Latest round whose masked inputs were collected (0 before the first)."""
        return self._round

    @property
    def survivors(self) -> list[str]:
        """Sites whose inputs make up the latest round's sum."""
        return list(self._survivors)

    def collect_keys(self, adverts: Iterable[SessionAdvertiseKeys | str]) -> SessionKeyDirectory:
        """Setup: build the key directory to broadcast to every site."""
        if self._c_pks:
            raise SecAggProtocolError(f"keys of job {self.job_id!r} were already collected")
        got = collect_messages(SessionAdvertiseKeys, adverts, self.job_id, self.sites,
                               "AdvertiseKeys")
        for s, m in got.items():
            if m.rounds != self.rounds:
                raise SecAggMessageError(
                    f"site {s!r} advertised keys for {m.rounds} rounds, job has {self.rounds}"
                )
        total = len(self.sites) if self.sites is not None else len(got)
        _too_few(len(got), total, self.min_survivors, "AdvertiseKeys",
                 set(self.sites or ()) - set(got))
        self._c_pks = {s: _b64d(m.c_pk, "c_pk") for s, m in got.items()}
        self._s_pks = {s: [_b64d(k, "s_pk") for k in m.s_pks] for s, m in got.items()}
        keys = {s: {"c_pk": m.c_pk, "s_pks": m.s_pks, "signature": m.signature}
                for s, m in sorted(got.items())}
        return SessionKeyDirectory(self.job_id, self.threshold, self.bits, self.vector_length,
                                   self.rounds, keys)

    def route_shares(self, messages: Iterable[SessionShares | str]) -> dict[str, SessionInbox]:
        """Setup: check every site shared with every other and keep each site's inbox.

        Every site of the directory must share: the others mask with its keys from round 1 on,
        and K needs every member's contribution. If one is silent, restart the setup under a
        new job id without it.
        """
        if not self._c_pks:
            raise SecAggProtocolError("route_shares before collect_keys")
        if self._inboxes:
            raise SecAggProtocolError(f"shares of job {self.job_id!r} were already routed")
        sites = sorted(self._c_pks)
        got = collect_messages(SessionShares, messages, self.job_id, sites, "ShareKeys")
        silent = sorted(set(sites) - set(got))
        if silent:
            raise SecAggThresholdError(
                f"sites {silent} advertised keys but did not share them; every site of the key "
                "directory must share before round 1 (restart setup under a new job id "
                "without them)"
            )
        for u, msg in got.items():
            want = set(sites) - {u}
            if set(msg.ciphertexts) != want:
                raise SecAggMessageError(
                    f"site {u!r} sent shares for {sorted(msg.ciphertexts)}, expected "
                    f"{sorted(want)}"
                )
        inboxes = {v: SessionInbox(self.job_id, v, sites,
                                   {u: got[u].ciphertexts[v] for u in sites if u != v})
                   for v in sites}
        self._inboxes = {v: m.to_str() for v, m in inboxes.items()}
        return inboxes

    def inbox(self, site: str) -> SessionInbox:
        """The stored inbox of `site`, to hand over with its first masked input."""
        if site not in self._inboxes:
            raise SecAggUnknownSenderError(f"no shares inbox for site {site!r} in this job")
        return SessionInbox.from_str(self._inboxes[site])

    def collect_masked(self, r: int, messages: Iterable[SessionMaskedInput | str],
                       roster: Iterable[str] | None = None) -> SessionRecoverRequest | None:
        """Round r: validate and add the masked inputs; fix survivors and dropped.

        Returns None if no site dropped (the masked sum is ready), else the recovery request
        to send to the survivors. Dropped = active sites that did not answer, plus
        already-dropped sites that a survivor still masked with (it had not heard of it).
        A buffered session takes the round's ``roster`` (the sites called): its members that
        did not answer are dropped for this round only.
        """
        if self.buffered != (roster is not None):
            raise SecAggProtocolError("a buffered session's round needs its roster; any other "
                                      "takes none")
        if not self._inboxes:
            raise SecAggProtocolError("collect_masked before route_shares")
        if type(r) is not int or not 1 <= r <= self.rounds:
            raise SecAggRoundError(f"round {r!r} is outside 1..{self.rounds} of job "
                                   f"{self.job_id!r}")
        if r <= self._round:
            raise SecAggRoundError(
                f"round {r} of job {self.job_id!r} comes after round {self._round}: rounds must "
                "strictly increase"
            )
        step = f"MaskedInput of round {r}"
        got = collect_messages(SessionMaskedInput, messages, self.job_id, self.participants, step)
        active = set(self.active) if roster is None else set(roster)
        if not active <= set(self.participants):
            raise SecAggUnknownSenderError(f"round-{r} roster names non-participants "
                                           f"{sorted(active - set(self.participants))}")
        for u, msg in got.items():
            if u in self._dropped:
                raise SecAggUnknownSenderError(
                    f"site {u!r} was dropped in round {self._dropped[u]} (its mask key was "
                    f"revealed) and cannot rejoin job {self.job_id!r}; ask only server.active"
                )
            if msg.round != r:
                raise SecAggMessageError(f"site {u!r} sent round {msg.round} in round {r}")
            if msg.bits != self.bits_of(r):
                raise SecAggModulusError(
                    f"site {u!r} masked modulo 2^{msg.bits}, this job sums round {r} modulo "
                    f"2^{self.bits_of(r)}"
                )
            if msg.vector_length != self.vector_length:
                raise SecAggLengthError(f"site {u!r} sent {msg.vector_length} values, this job "
                                        f"has {self.vector_length}")
            peers = set(msg.peers)
            allowed = set(self.participants) if roster is None else active  # a roster: exactly it
            bad = sorted((peers - allowed) | ({u} & peers) | ({u} - allowed))
            skipped = sorted(active - peers - {u})
            if bad or skipped or len(peers) != len(msg.peers):
                raise SecAggMessageError(
                    f"site {u!r} masked with peers {msg.peers}: unknown/self {bad}, active "
                    f"but left out {skipped}"
                )
        _too_few(len(got), len(active), self.min_survivors, step, active - set(got))
        total = np.zeros(self.vector_length, dtype=np.uint64)
        for msg in got.values():
            total += msg.values()  # validates length and modulus
        survivors = sorted(got)
        needed = set().union(*(set(got[u].peers) for u in survivors))
        dropped = sorted((active - set(got)) | (needed - active))
        for v in dropped if not self.buffered else ():  # buffered: out for this round only
            self._dropped.setdefault(v, r)
        self._round, self._survivors, self._round_dropped = r, survivors, dropped
        self._peers = {u: list(got[u].peers) for u in survivors}
        self._sum = _pack(total & _mask(self.bits_of(r)), self.bits_of(r))
        if not dropped:
            return None
        return SessionRecoverRequest(self.job_id, r, survivors, dropped)

    def recover(self, r: int, responses: Iterable[SessionRecoverShares | str]) -> None:
        """Round r: rebuild the dropped sites' round-r keys, remove their pairwise masks."""
        if r != self._round or not self._round_dropped:
            raise SecAggRoundError(f"round {r!r} has no pending recovery (open round: "
                                   f"{self._round or 'none'})")
        u3, dropped = self._survivors, self._round_dropped
        step = f"Recovery of round {r}"
        got = collect_messages(SessionRecoverShares, responses, self.job_id, u3, step)
        _too_few(len(got), len(u3), self.threshold, step, set(u3) - set(got))
        for w, msg in got.items():
            if msg.round != r:
                raise SecAggMessageError(f"site {w!r} answered for round {msg.round}, not {r}")
            if set(msg.sk_shares) != set(dropped):
                raise SecAggMessageError(f"site {w!r} revealed keys of {sorted(msg.sk_shares)}, "
                                         f"expected {dropped}")
        bits = self.bits_of(r)
        total = _unpack(self._sum, bits, self.vector_length, "the round's sum")
        total = _remove_dropped_masks(total, self.job_id, r, self.participants, self.threshold,
                                      self._s_pks, self._peers, dropped, got)
        self._sum, self._round_dropped = _pack(total & _mask(bits), bits), []

    def masked_sum(self, r: int) -> SessionMaskedSum:
        """Round r's sum, pairwise masks removed, self-masks still on: for the sites to open."""
        if r != self._round or self._round_dropped or not self._sum:
            waiting = f", awaiting recovery of {self._round_dropped}" if self._round_dropped else ""
            raise SecAggRoundError(
                f"round {r!r} has no masked sum ready (latest round {self._round or 'none'}"
                f"{waiting})")
        return SessionMaskedSum(self.job_id, r, list(self._survivors), self.bits_of(r),
                                self.vector_length, self._sum)

    def collect_opened(self, r: int, messages: Iterable[SessionOpenedSum | str]) -> np.ndarray:
        """The sum of round r as the survivors opened it; every opener must agree."""
        got = collect_messages(SessionOpenedSum, messages, self.job_id, self._survivors,
                               f"OpenedSum of round {r}")
        if r != self._round or not got:
            raise SecAggRoundError(f"no opened sum of round {r!r} (latest round "
                                   f"{self._round or 'none'}, {len(got)} answers)")
        for w, msg in got.items():
            if msg.round != r or msg.survivors != self._survivors:
                raise SecAggMessageError(
                    f"site {w!r} opened round {msg.round} over {msg.survivors}, expected round "
                    f"{r} over {self._survivors}")
        values = {msg.data for msg in got.values()}
        if len(values) != 1:
            raise SecAggReconstructionError(
                f"sites {sorted(got)} opened different sums of round {r} (a site holds another "
                "federation key, or its state is corrupted)")
        return _unpack(values.pop(), self.bits_of(r), self.vector_length, "the opened sum")

    # -- state
    def export_state(self) -> str:
        """Server state as JSON: public keys, inboxes (ciphertexts), round, masked sum."""
        return json.dumps({
            "kind": "secagg_session_server_state", "protocol": PROTOCOL,
            "threshold": self.threshold, "bits": self.bits, "vector_length": self.vector_length,
            "round_bits": self.round_bits, "job_id": self.job_id, "rounds": self.rounds,
            "buffered": self.buffered,
            "sites": self.sites,
            "min_survivors": self.min_survivors,
            "c_pks": {s: _b64e(k) for s, k in self._c_pks.items()},
            "s_pks": {s: [_b64e(k) for k in ks] for s, ks in self._s_pks.items()},
            "inboxes": self._inboxes, "dropped": self._dropped, "round": self._round,
            "survivors": self._survivors, "round_dropped": self._round_dropped,
            "peers": self._peers, "sum": self._sum,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_state(cls, state: str) -> SecAggSessionServer:
        """Resume a server from `export_state()` output."""
        try:
            st = json.loads(state)
            if st.get("kind") != "secagg_session_server_state" or st.get("protocol") != PROTOCOL:
                raise SecAggMessageError(f"not a {PROTOCOL} session server state")
            srv = cls(st["threshold"], st["bits"], st["vector_length"], st["job_id"],
                      st["rounds"], sites=st["sites"], min_survivors=st["min_survivors"],
                      round_bits=st.get("round_bits"),
                      buffered=bool(st.get("buffered", False)))
            srv._c_pks = {s: _b64d(k, "c_pk", _KEY) for s, k in st["c_pks"].items()}
            srv._s_pks = {s: [_b64d(k, "s_pk", _KEY) for k in ks]
                          for s, ks in st["s_pks"].items()}
            srv._inboxes = dict(st["inboxes"])
            srv._dropped = {str(s): int(r) for s, r in st["dropped"].items()}
            srv._round = int(st["round"])
            srv._survivors, srv._round_dropped = list(st["survivors"]), list(st["round_dropped"])
            srv._peers = {u: list(p) for u, p in st["peers"].items()}
            srv._sum = str(st["sum"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _state_error("server", exc) from None
        return srv


# ---------------------------------------------------------------- in-process driver


def run_secure_sum_session(vectors_per_round: list[dict[str, np.ndarray]], threshold: int,
                           bits: int, drop: dict[int, set[str]] | None = None, *,
                           silent_in_recovery: dict[int, set[str]] | None = None,
                           job_id: str | None = None) -> list[np.ndarray]:
    """Run a whole job in one process; per round, the sum of that round's survivors.

    Rounds are numbered from 1 (`vectors_per_round[0]` is round 1). `drop[r]` sites send no
    masked input in round r and are dropped for good; `silent_in_recovery[r]` sites mask but
    do not answer round r's recovery request. Every message goes through `to_str()` /
    `from_str()` and every client and server call through state export/import, just as in
    the stateless per-site calls.
    """
    if not vectors_per_round:
        raise SecAggRoundError("no rounds given")
    sites = sorted(set().union(*vectors_per_round))
    if not sites:
        raise SecAggThresholdError("no sites given")
    rounds = len(vectors_per_round)
    drop = {r: set(s) for r, s in (drop or {}).items()}
    silent = {r: set(s) for r, s in (silent_in_recovery or {}).items()}
    for name, plan in (("drop", drop), ("silent_in_recovery", silent)):
        bad_rounds = sorted(r for r in plan if not 1 <= r <= rounds)
        if bad_rounds:
            raise SecAggRoundError(f"{name} names rounds {bad_rounds} outside 1..{rounds}")
        unknown = sorted(set().union(*plan.values()) - set(sites)) if plan else []
        if unknown:
            raise SecAggUnknownSenderError(f"{name} names unknown sites {unknown}")
    first = vectors_per_round[0][min(vectors_per_round[0])] if vectors_per_round[0] else None
    if first is None or np.ndim(first) != 1:
        raise SecAggLengthError("round 1 needs one-dimensional vectors")
    length = len(first)
    job_id = job_id or secrets.token_hex(8)
    server_state = SecAggSessionServer(threshold, bits, length, job_id, rounds,
                                       sites=sites).export_state()
    states = {s: SecAggSessionClient(s, job_id=job_id, threshold=threshold, bits=bits,
                                     vector_length=length, rounds=rounds).export_state()
              for s in sites}

    def serve(call: Callable[[SecAggSessionServer], Any]) -> Any:
        nonlocal server_state
        server = SecAggSessionServer.from_state(server_state)
        out = call(server)
        server_state = server.export_state()
        return out

    def step(site: str, call: Callable[[SecAggSessionClient], Any]) -> Any:
        client = SecAggSessionClient.from_state(states[site])
        out = call(client)
        states[site] = client.export_state()
        return out

    adverts = [step(s, lambda c: c.advertise().to_str()) for s in sites]
    directory = serve(lambda v: v.collect_keys(adverts).to_str())
    shares = [step(s, lambda c: c.share(directory).to_str()) for s in sites]
    serve(lambda v: v.route_shares(shares))
    inboxes = {s: serve(lambda v, s=s: v.inbox(s).to_str()) for s in sites}
    sums: list[np.ndarray] = []
    previous: str | None = None
    for r, vectors in enumerate(vectors_per_round, start=1):
        live = [s for s in serve(lambda v: v.active) if s not in drop.get(r, set())]
        missing = sorted(s for s in live if s not in vectors)
        if missing:
            raise SecAggLengthError(f"round {r}: no vector for active sites {missing}")
        opened, masked = [], []
        for s in live:
            client = SecAggSessionClient.from_state(states[s])  # one site call: open, then mask
            if previous:
                opened.append(client.open_sum(previous).to_str())
            masked.append(client.masked_input(r, vectors[s], inboxes[s]).to_str())
            states[s] = client.export_state()
        if previous:
            sums.append(serve(lambda v, r=r, o=opened: v.collect_opened(r - 1, o)))
        request = serve(lambda v, r=r, m=masked: v.collect_masked(r, m))
        if request is not None:
            request = request.to_str()
            answers = [step(s, lambda c, q=request: c.recover(q).to_str())
                       for s in live if s not in silent.get(r, set())]
            serve(lambda v, r=r, a=answers: v.recover(r, a))
        previous = serve(lambda v, r=r: v.masked_sum(r).to_str())
    final = [step(s, lambda c: c.open_sum(previous).to_str())
             for s in serve(lambda v: v.survivors)]
    sums.append(serve(lambda v: v.collect_opened(rounds, final)))
    return sums
