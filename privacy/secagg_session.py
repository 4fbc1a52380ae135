"""Multi-round secure sum: one key setup per job, then two calls per site per training round.

`privacy.secagg` runs one Bonawitz et al. (CCS 2017) instance in four calls per site. A
training job sums once per round, and a PySyft call costs ~0.4 s per site, so this module
splits the protocol into a setup paid once per job and a two-call round:

Setup (2 calls per site)
  advertise()       one X25519 pair c (encrypts site-to-site shares) and, for every round
                    r = 1..R, an X25519 pair s_r (agrees round-r pairwise mask seeds).
  share(directory)  for every round r: draw a self-mask seed b_{u,r} (32 random bytes) and
                    Shamir-share b_{u,r} and s_sk_{u,r} (threshold t, pycryptodome GF(2^128),
                    see `secagg._split32`). Each recipient v gets ONE AES-256-GCM ciphertext
                    with its shares for all R rounds, key HKDF(X25519(c_sk_u, c_pk_v)), associated
                    data = job, sender, recipient and the digest of the key directory (so sites
                    that were shown different directories cannot decrypt each other). The site
                    also publishes SHA-256 commitments to every b_{u,r}.
  The server keeps each site's inbox and hands it back with every unmask request: no extra
  call, and the site re-authenticates it each time (AES-GCM, bound to itself and the job).

Round r (2 calls per site)
  masked_input(r, x)  y = x + PRG(b_{u,r}) + sum_{v in P, u<v} PRG(s_uv,r)
                      - sum_{v in P, u>v} PRG(s_uv,r) mod 2^bits, with
                      s_uv,r = HKDF(X25519(s_sk_{u,r}, s_pk_{v,r}), job|r|sorted pair) and P the
                      site's active peers. The message names P so the server knows which
                      pairwise masks it must remove.
  unmask(r, req, inbox)  shares of b_{v,r} for the survivors of round r, of s_sk_{v,r} for the
                      sites dropped in round r. Never both for one (v, r).

Why a key pair per round instead of one long-term s key: once a site v drops in round r, the
server learns its s secret key. With a long-term key it could then recompute every pairwise
mask v ever used, and together with the b_{v,r'} it rebuilt in the rounds v survived, it would
unmask all of v's earlier inputs. With per-round keys only round r's pairwise masks are
exposed, and in round r the server does not get b_{v,r}.

Dropouts are permanent. A site whose round-r key was revealed is dropped for the rest of the
job: the server stops accepting its inputs; every site that learns of the drop (from an unmask
request it answers) excludes it from later masks and refuses later requests that call it a
survivor. A site that missed that request still masks with the dropped peer. It says so in its
`peers` list, and the server then asks for the dropped peer's key for that round as well.
(Per-round keys would make a safe rejoin possible. That is deliberately not offered.)

Client rules: rounds must be within 1..R and strictly increasing. Skipping rounds is allowed,
but going back is not. Masking round r again is allowed only with the same input, and returns
the same message. A site unmasks only the latest round it masked, only as a listed survivor,
and only when at least t survivors are listed.

Threat model as `privacy.secagg`: semi-honest server, up to t-1 colluding sites. Without
signatures a malicious server could substitute keys, and there is no ConsistencyCheck round.
Use t > n/2 if the server may deviate. Exported client state holds secret keys.
"""

from __future__ import annotations

import hashlib
import hmac
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


def _pair_seed(s_sk: X25519PrivateKey, peer_pk: bytes, job_id: str, r: int,
               a: str, b: str) -> bytes:
    """Round-r seed of sites a (owner of s_sk) and b (owner of peer_pk), symmetric in a, b."""
    lo, hi = sorted((a, b))
    return _hkdf(_exchange(s_sk, peer_pk, b), _label("session-pair-mask", job_id, str(r), lo, hi))


def _self_seed(b: bytes, job_id: str, r: int, site: str) -> bytes:
    return _hkdf(b, _label("session-self-mask", job_id, str(r), site))


def _commit(b: bytes, job_id: str, r: int, site: str) -> bytes:
    return hashlib.sha256(_label("session-b-commit", job_id, str(r), site) + b).digest()


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
    """Setup, site -> server: b commitments per round, one AES-GCM blob per recipient."""

    KIND = "session_shares"
    job_id: str
    sender: str
    b_commitments: list[str]
    ciphertexts: dict[str, str]

    def check(self) -> None:
        super().check()
        _check_sender(self)
        _want(_is_str_list(self.b_commitments), self.KIND, "b_commitments must be a list")
        for c in self.b_commitments:
            _b64d(c, f"b commitment of site {self.sender!r}", 32)
        _want(_is_str_map(self.ciphertexts), self.KIND, "ciphertexts must map site -> base64")


@dataclass(frozen=True)
class SessionInbox(_Message):
    """Server -> one site, with every unmask request: the ciphertexts addressed to it."""

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
class SessionUnmaskRequest(_Message):
    """Round r, server -> survivors: who survived (reveal b_{v,r}), who dropped now (reveal
    s_sk_{v,r}), and who was dropped in earlier rounds (`gone`: reveal nothing, exclude)."""

    KIND = "session_unmask_request"
    job_id: str
    round: int
    survivors: list[str]
    dropped: list[str]
    gone: list[str]

    def check(self) -> None:
        super().check()
        _check_round_field(self)
        _want(all(_is_str_list(x) for x in (self.survivors, self.dropped, self.gone)),
              self.KIND, "survivors, dropped and gone must be lists of site ids")


@dataclass(frozen=True)
class SessionUnmaskShares(_Message):
    """Round r, site -> server: its shares of b_{v,r} (survivors) and s_sk_{v,r} (dropped)."""

    KIND = "session_unmask_shares"
    job_id: str
    sender: str
    round: int
    b_shares: dict[str, str]
    sk_shares: dict[str, str]

    def check(self) -> None:
        super().check()
        _check_sender(self)
        _check_round_field(self)
        _want(_is_str_map(self.b_shares) and _is_str_map(self.sk_shares), self.KIND,
              "b_shares and sk_shares must map site -> base64")


def _state_error(what: str, exc: Exception) -> SecAggError:
    if isinstance(exc, SecAggError):
        return exc
    return SecAggMessageError(f"corrupt secure-aggregation session {what} state ({exc!r})")


# ---------------------------------------------------------------- client


class SecAggSessionClient:
    """One site's side for a whole job. Call `export_state()` after every call and
    `from_state()` before the next one.

    Order: advertise -> share -> (masked_input(r) -> unmask(r)) for increasing r.
    """

    def __init__(self, site_id: str, *, job_id: str, threshold: int, bits: int,
                 vector_length: int, rounds: int) -> None:
        _check_params(threshold, bits, vector_length)
        _check_rounds(rounds)
        if not isinstance(site_id, str) or not site_id:
            raise SecAggMessageError(f"site_id must be a non-empty string, got {site_id!r}")
        if not isinstance(job_id, str):
            raise SecAggMessageError(f"job_id must be a string, got {job_id!r}")
        self.site_id, self.job_id = site_id, job_id
        self.threshold, self.bits, self.vector_length = threshold, bits, vector_length
        self.rounds = rounds
        self._c_sk = X25519PrivateKey.generate()
        self._s_sks = [X25519PrivateKey.generate() for _ in range(rounds)]
        self._bs = [secrets.token_bytes(_KEY) for _ in range(rounds)]
        self._phase = "keys"
        self._dir_digest = ""
        self._share_msg = ""
        self._sites: list[str] = []  # every site of the job (directory == sharers)
        self._c_pks: dict[str, bytes] = {}
        self._s_pks: dict[str, list[bytes]] = {}
        self._own: list[tuple[bytes, bytes]] = []  # own-index shares of own (b_r, s_sk_r)
        self._round = 0  # latest masked round
        self._input_digest = ""
        self._peers: list[str] = []  # peers masked with in self._round
        self._dropped: dict[str, int] = {}  # peer -> round this site learned it was dropped
        self._revealed_b: set[str] = set()  # in self._round
        self._revealed_sk: set[str] = set()

    def _error_job(self, job_id: str, what: str) -> None:
        if job_id != self.job_id:
            raise SecAggMessageError(
                f"site {self.site_id!r}: {what} is for job {job_id!r}, not {self.job_id!r}"
            )

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
        """Shamir-share b_{u,r} and s_sk_{u,r} for every round, one ciphertext per recipient."""
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
        if len(d.keys) < self.threshold:
            raise SecAggThresholdError(
                f"key directory lists only {len(d.keys)} sites, threshold is {self.threshold}"
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
        b_sh = [_split32(b, self.threshold, n) for b in self._bs]
        sk_sh = [_split32(k.private_bytes_raw(), self.threshold, n) for k in self._s_sks]
        cts: dict[str, str] = {}
        for i, v in enumerate(sites):
            if v == self.site_id:
                continue
            plain = _HEADER.pack(i + 1, self.rounds) + b"".join(
                b_sh[r][i] + sk_sh[r][i] for r in range(self.rounds))
            key = _enc_key(self._c_sk, c_pks[v], v, self.job_id, self.site_id, v)
            nonce = secrets.token_bytes(_NONCE)
            aad = _enc_aad(self.job_id, self.site_id, v, digest)
            cts[v] = _b64e(nonce + AESGCM(key).encrypt(nonce, plain, aad))
        commits = [_b64e(_commit(b, self.job_id, r, self.site_id))
                   for r, b in enumerate(self._bs, start=1)]
        msg = SessionShares(self.job_id, self.site_id, commits, cts)
        self._sites, self._c_pks, self._s_pks = sites, c_pks, s_pks
        self._own = [(b_sh[r][me], sk_sh[r][me]) for r in range(self.rounds)]
        self._phase, self._dir_digest, self._share_msg = "shared", digest, msg.to_str()
        return msg

    # -- round r
    def masked_input(self, r: int, x: np.ndarray) -> SessionMaskedInput:
        """Mask x for round r with b_{u,r} and round-r pairwise seeds over the active peers."""
        if self._phase != "shared":
            raise SecAggProtocolError(f"site {self.site_id!r}: masked_input before share")
        if type(r) is not int or not 1 <= r <= self.rounds:
            raise SecAggRoundError(
                f"site {self.site_id!r}: round {r!r} is outside 1..{self.rounds} of job "
                f"{self.job_id!r}"
            )
        xs = _as_residues(x, self.bits, self.vector_length, self.site_id)
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
            peers = [v for v in self._sites if v != self.site_id and v not in self._dropped]
            if len(peers) + 1 < self.threshold:
                raise SecAggThresholdError(
                    f"site {self.site_id!r}: only {len(peers) + 1} sites are still active in "
                    f"round {r}, threshold is {self.threshold}"
                )
        n, me = self.vector_length, self.site_id
        acc = xs.copy()
        acc += _prg_u64(_self_seed(self._bs[r - 1], self.job_id, r, me), n)
        s_sk = self._s_sks[r - 1]
        for v in peers:
            stream = _prg_u64(_pair_seed(s_sk, self._s_pks[v][r - 1], self.job_id, r, me, v), n)
            if me < v:
                acc += stream
            else:
                acc -= stream
        acc &= _mask(self.bits)
        if r != self._round:
            self._round, self._input_digest, self._peers = r, digest, peers
            self._revealed_b, self._revealed_sk = set(), set()
        return SessionMaskedInput(self.job_id, me, r, self.bits, n, list(peers),
                                  _pack(acc, self.bits))

    def unmask(self, r: int, request: SessionUnmaskRequest | str,
               inbox: SessionInbox | str) -> SessionUnmaskShares:
        """Reveal round-r shares: b of survivors, s_sk of the dropped, never both for a peer."""
        req = SessionUnmaskRequest.coerce(request)
        box = SessionInbox.coerce(inbox)
        me = self.site_id
        self._error_job(req.job_id, "unmask request")
        if req.round != r:
            raise SecAggMessageError(
                f"site {me!r}: unmask request is for round {req.round}, called for round {r}"
            )
        if self._phase != "shared" or self._round != r:
            raise SecAggRoundError(
                f"site {me!r} did not mask round {r} (latest masked round: "
                f"{self._round or 'none'}), so it reveals nothing for it"
            )
        surv, drop, gone = set(req.survivors), set(req.dropped), set(req.gone)
        unknown = sorted((surv | drop | gone) - set(self._sites))
        if unknown:
            raise SecAggUnknownSenderError(
                f"site {me!r}: unmask request names sites {unknown} that are not in this job"
            )
        if drop & gone:
            raise SecAggMessageError(
                f"unmask request lists sites {sorted(drop & gone)} as both dropped and gone"
            )
        both = (surv & (drop | gone | self._revealed_sk | set(self._dropped))) | (
            drop & self._revealed_b)
        if both:
            raise SecAggUnmaskRefusedError(
                f"site {me!r} refuses round {r}: sites {sorted(both)} would get both their "
                "self-mask seed and mask key revealed (or were dropped earlier and cannot "
                "survive again); that would unmask their inputs"
            )
        if me not in surv:
            raise SecAggProtocolError(
                f"site {me!r} is not listed as a survivor of round {r} but was asked to unmask"
            )
        loose = sorted(set(self._peers) - surv - drop)
        if loose:
            raise SecAggMessageError(
                f"site {me!r}: round-{r} request leaves peers {loose} neither surviving nor "
                "dropped, their pairwise masks could not be removed"
            )
        if len(surv) < self.threshold:
            raise SecAggThresholdError(
                f"site {me!r}: round {r} lists only {len(surv)} survivors "
                f"{sorted(surv)}, threshold is {self.threshold}"
            )
        shares = self._open_inbox(box, (surv | drop) - {me})
        shares[me] = self._own
        b_out = {v: _b64e(shares[v][r - 1][0]) for v in sorted(surv)}
        sk_out = {v: _b64e(shares[v][r - 1][1]) for v in sorted(drop)}
        self._revealed_b |= surv
        self._revealed_sk |= drop
        for v in sorted(drop | gone):
            self._dropped.setdefault(v, r)
        return SessionUnmaskShares(self.job_id, me, r, b_out, sk_out)

    def _open_inbox(self, box: SessionInbox,
                    needed: set[str]) -> dict[str, list[tuple[bytes, bytes]]]:
        """Authenticate and decrypt the senders' blobs this site needs; bound to it and the job."""
        me = self.site_id
        self._error_job(box.job_id, "shares inbox")
        if box.recipient != me:
            raise SecAggMessageError(f"shares inbox for site {box.recipient!r} delivered to {me!r}")
        if sorted(box.senders) != self._sites:
            raise SecAggMessageError(
                f"site {me!r}: shares inbox lists senders {sorted(box.senders)}, the job has "
                f"{self._sites}"
            )
        missing = sorted(needed - set(box.ciphertexts))
        if missing:
            raise SecAggMessageError(f"site {me!r}: shares inbox has no ciphertext from {missing}")
        index = self._sites.index(me) + 1
        size = _HEADER.size + 2 * _KEY * self.rounds
        out: dict[str, list[tuple[bytes, bytes]]] = {}
        for v in sorted(needed):
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
            out[v] = [(body[64 * i:64 * i + 32], body[64 * i + 32:64 * i + 64])
                      for i in range(self.rounds)]
        return out

    # -- state
    def export_state(self) -> str:
        """All client state as JSON (holds secret keys: keep it at the site, never relay it)."""
        return json.dumps({
            "kind": "secagg_session_client_state", "protocol": PROTOCOL,
            "site_id": self.site_id, "job_id": self.job_id, "threshold": self.threshold,
            "bits": self.bits, "vector_length": self.vector_length, "rounds": self.rounds,
            "phase": self._phase,
            "c_sk": _b64e(self._c_sk.private_bytes_raw()),
            "s_sks": [_b64e(k.private_bytes_raw()) for k in self._s_sks],
            "bs": [_b64e(b) for b in self._bs],
            "dir_digest": self._dir_digest, "share_msg": self._share_msg, "sites": self._sites,
            "c_pks": {s: _b64e(k) for s, k in self._c_pks.items()},
            "s_pks": {s: [_b64e(k) for k in ks] for s, ks in self._s_pks.items()},
            "own": [[_b64e(b), _b64e(k)] for b, k in self._own],
            "round": self._round, "input_digest": self._input_digest, "peers": self._peers,
            "dropped": self._dropped,
            "revealed_b": sorted(self._revealed_b), "revealed_sk": sorted(self._revealed_sk),
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
            c.rounds = st["rounds"]
            _check_params(c.threshold, c.bits, c.vector_length)
            _check_rounds(c.rounds)
            c._phase = st["phase"]
            key = X25519PrivateKey.from_private_bytes
            c._c_sk = key(_b64d(st["c_sk"], "c_sk", _KEY))
            c._s_sks = [key(_b64d(k, "s_sk", _KEY)) for k in st["s_sks"]]
            c._bs = [_b64d(b, "b", _KEY) for b in st["bs"]]
            if len(c._s_sks) != c.rounds or len(c._bs) != c.rounds:
                raise SecAggMessageError("session client state: key count != rounds")
            c._dir_digest, c._share_msg = st["dir_digest"], st["share_msg"]
            c._sites = list(st["sites"])
            c._c_pks = {s: _b64d(k, "c_pk", _KEY) for s, k in st["c_pks"].items()}
            c._s_pks = {s: [_b64d(k, "s_pk", _KEY) for k in ks] for s, ks in st["s_pks"].items()}
            c._own = [(_b64d(b, "b share", _KEY), _b64d(k, "sk share", _KEY))
                      for b, k in st["own"]]
            c._round, c._input_digest = int(st["round"]), st["input_digest"]
            c._peers = list(st["peers"])
            c._dropped = {str(s): int(r) for s, r in st["dropped"].items()}
            c._revealed_b, c._revealed_sk = set(st["revealed_b"]), set(st["revealed_sk"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _state_error("client", exc) from None
        return c


# ---------------------------------------------------------------- server


class SecAggSessionServer:
    """Orchestrator side for a whole job: relays and stores ciphertexts it cannot read, then
    every round collects masked inputs and removes the masks.

    Per round it learns only the sum of that round's survivors and who dropped out.
    """

    def __init__(self, threshold: int, bits: int, vector_length: int, job_id: str,
                 rounds: int, *, sites: Iterable[str] | None = None) -> None:
        _check_params(threshold, bits, vector_length)
        _check_rounds(rounds)
        if not isinstance(job_id, str):
            raise SecAggMessageError(f"job_id must be a string, got {job_id!r}")
        self.threshold, self.bits, self.vector_length = threshold, bits, vector_length
        self.job_id, self.rounds = job_id, rounds
        self.sites = sorted(sites) if sites is not None else None
        self._c_pks: dict[str, bytes] = {}
        self._s_pks: dict[str, list[bytes]] = {}
        self._commitments: dict[str, list[bytes]] = {}
        self._inboxes: dict[str, str] = {}
        self._dropped: dict[str, int] = {}  # site -> round its mask key was revealed
        self._round = 0  # latest collected round
        self._done = True  # latest collected round was unmasked (or abandoned)
        self._survivors: list[str] = []
        self._round_dropped: list[str] = []
        self._peers: dict[str, list[str]] = {}
        self._masked: dict[str, str] = {}  # survivor -> packed masked vector

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
        _too_few(len(got), total, self.threshold, "AdvertiseKeys", set(self.sites or ()) - set(got))
        self._c_pks = {s: _b64d(m.c_pk, "c_pk") for s, m in got.items()}
        self._s_pks = {s: [_b64d(k, "s_pk") for k in m.s_pks] for s, m in got.items()}
        keys = {s: {"c_pk": m.c_pk, "s_pks": m.s_pks, "signature": m.signature}
                for s, m in sorted(got.items())}
        return SessionKeyDirectory(self.job_id, self.threshold, self.bits, self.vector_length,
                                   self.rounds, keys)

    def route_shares(self, messages: Iterable[SessionShares | str]) -> dict[str, SessionInbox]:
        """Setup: check every site shared with every other and keep each site's inbox.

        Every site of the directory must share: the others mask with its keys from round 1 on,
        and a site that never shared could never be unmasked. If one is silent, restart the
        setup under a new job id without it.
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
            if len(msg.b_commitments) != self.rounds:
                raise SecAggMessageError(
                    f"site {u!r} committed to {len(msg.b_commitments)} self-mask seeds, job "
                    f"has {self.rounds} rounds"
                )
        self._commitments = {u: [_b64d(c, "b commitment", 32) for c in got[u].b_commitments]
                             for u in sites}
        inboxes = {v: SessionInbox(self.job_id, v, sites,
                                   {u: got[u].ciphertexts[v] for u in sites if u != v})
                   for v in sites}
        self._inboxes = {v: m.to_str() for v, m in inboxes.items()}
        return inboxes

    def inbox(self, site: str) -> SessionInbox:
        """The stored inbox of `site`, to hand back with every unmask request."""
        if site not in self._inboxes:
            raise SecAggUnknownSenderError(f"no shares inbox for site {site!r} in this job")
        return SessionInbox.from_str(self._inboxes[site])

    def collect_masked(self, r: int, messages: Iterable[SessionMaskedInput | str]
                       ) -> SessionUnmaskRequest:
        """Round r: validate masked inputs, fix survivors/dropped, build the unmask request.

        Dropped = active sites that did not answer, plus already-dropped sites that a
        survivor still masked with (it had not heard of the drop).
        """
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
        active = set(self.active)
        for u, msg in got.items():
            if u in self._dropped:
                raise SecAggUnknownSenderError(
                    f"site {u!r} was dropped in round {self._dropped[u]} (its mask key was "
                    f"revealed) and cannot rejoin job {self.job_id!r}; ask only server.active"
                )
            if msg.round != r:
                raise SecAggMessageError(f"site {u!r} sent round {msg.round} in round {r}")
            if msg.bits != self.bits:
                raise SecAggModulusError(
                    f"site {u!r} masked modulo 2^{msg.bits}, this job sums modulo 2^{self.bits}"
                )
            if msg.vector_length != self.vector_length:
                raise SecAggLengthError(f"site {u!r} sent {msg.vector_length} values, this job "
                                        f"has {self.vector_length}")
            peers = set(msg.peers)
            bad = sorted(peers - set(self.participants) | ({u} & peers))
            skipped = sorted(active - peers - {u})
            if bad or skipped or len(peers) != len(msg.peers):
                raise SecAggMessageError(
                    f"site {u!r} masked with peers {msg.peers}: unknown/self {bad}, active "
                    f"but left out {skipped}"
                )
            msg.values()  # validates length and modulus now, not at unmask time
        _too_few(len(got), len(active), self.threshold, step, active - set(got))
        survivors = sorted(got)
        needed = set().union(*(set(got[u].peers) for u in survivors))
        dropped = sorted((active - set(got)) | (needed - active))
        for v in dropped:
            self._dropped.setdefault(v, r)
        self._round, self._done = r, False
        self._survivors, self._round_dropped = survivors, dropped
        self._peers = {u: list(got[u].peers) for u in survivors}
        self._masked = {u: got[u].data for u in survivors}
        gone = sorted(set(self._dropped) - set(dropped))
        return SessionUnmaskRequest(self.job_id, r, survivors, dropped, gone)

    def unmask(self, r: int, responses: Iterable[SessionUnmaskShares | str]) -> np.ndarray:
        """Round r: rebuild b_{u,r} (survivors), s_sk_{v,r} (dropped); return the sum mod 2^bits."""
        if r != self._round or self._done:
            raise SecAggRoundError(
                f"cannot unmask round {r!r}: the open round is "
                f"{self._round if not self._done else 'none'}"
            )
        u3, dropped = self._survivors, self._round_dropped
        step = f"Unmasking of round {r}"
        got = collect_messages(SessionUnmaskShares, responses, self.job_id, u3, step)
        _too_few(len(got), len(u3), self.threshold, step, set(u3) - set(got))
        for w, msg in got.items():
            if msg.round != r:
                raise SecAggMessageError(f"site {w!r} answered for round {msg.round}, not {r}")
            if set(msg.b_shares) != set(u3) or set(msg.sk_shares) != set(dropped):
                raise SecAggMessageError(
                    f"site {w!r} answered for b={sorted(msg.b_shares)}, "
                    f"sk={sorted(msg.sk_shares)}; expected b={u3}, sk={dropped}"
                )
        index = {s: i + 1 for i, s in enumerate(self.participants)}
        chosen = sorted(got)[: self.threshold]

        def rebuild(v: str, field: str) -> bytes:
            return _combine32([(index[w], _b64d(getattr(got[w], field)[v],
                                                f"share from {w!r}", _KEY)) for w in chosen])

        n, rr = self.vector_length, r - 1
        total = np.zeros(n, dtype=np.uint64)
        for u in u3:
            total += _unpack(self._masked[u], self.bits, n, u)
            b = rebuild(u, "b_shares")
            if not hmac.compare_digest(_commit(b, self.job_id, r, u), self._commitments[u][rr]):
                raise SecAggReconstructionError(
                    f"round-{r} self-mask seed of site {u!r} rebuilt from {chosen} does not "
                    "match its commitment (corrupted shares)"
                )
            total -= _prg_u64(_self_seed(b, self.job_id, r, u), n)
        keys: dict[str, X25519PrivateKey] = {}
        for v in dropped:
            keys[v] = X25519PrivateKey.from_private_bytes(rebuild(v, "sk_shares"))
            if _pub(keys[v]) != self._s_pks[v][rr]:
                raise SecAggReconstructionError(
                    f"round-{r} mask key of dropped site {v!r} rebuilt from {chosen} does not "
                    "match its public key (corrupted shares)"
                )
        for u in u3:  # u added +PRG(s_uv) if u < v else -PRG(s_uv); survivor pairs cancel
            for v in self._peers[u]:
                if v in keys:
                    seed = _pair_seed(keys[v], self._s_pks[u][rr], self.job_id, r, v, u)
                    if u < v:
                        total -= _prg_u64(seed, n)
                    else:
                        total += _prg_u64(seed, n)
        self._done, self._masked = True, {}
        return total & _mask(self.bits)

    # -- state
    def export_state(self) -> str:
        """Server state as JSON: public keys, commitments, inboxes (ciphertexts), round."""
        return json.dumps({
            "kind": "secagg_session_server_state", "protocol": PROTOCOL,
            "threshold": self.threshold, "bits": self.bits, "vector_length": self.vector_length,
            "job_id": self.job_id, "rounds": self.rounds, "sites": self.sites,
            "c_pks": {s: _b64e(k) for s, k in self._c_pks.items()},
            "s_pks": {s: [_b64e(k) for k in ks] for s, ks in self._s_pks.items()},
            "commitments": {s: [_b64e(c) for c in cs] for s, cs in self._commitments.items()},
            "inboxes": self._inboxes, "dropped": self._dropped, "round": self._round,
            "done": self._done, "survivors": self._survivors,
            "round_dropped": self._round_dropped, "peers": self._peers, "masked": self._masked,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_state(cls, state: str) -> SecAggSessionServer:
        """Resume a server from `export_state()` output."""
        try:
            st = json.loads(state)
            if st.get("kind") != "secagg_session_server_state" or st.get("protocol") != PROTOCOL:
                raise SecAggMessageError(f"not a {PROTOCOL} session server state")
            srv = cls(st["threshold"], st["bits"], st["vector_length"], st["job_id"],
                      st["rounds"], sites=st["sites"])
            srv._c_pks = {s: _b64d(k, "c_pk", _KEY) for s, k in st["c_pks"].items()}
            srv._s_pks = {s: [_b64d(k, "s_pk", _KEY) for k in ks]
                          for s, ks in st["s_pks"].items()}
            srv._commitments = {s: [_b64d(c, "b commitment", 32) for c in cs]
                                for s, cs in st["commitments"].items()}
            srv._inboxes = dict(st["inboxes"])
            srv._dropped = {str(s): int(r) for s, r in st["dropped"].items()}
            srv._round, srv._done = int(st["round"]), bool(st["done"])
            srv._survivors, srv._round_dropped = list(st["survivors"]), list(st["round_dropped"])
            srv._peers = {u: list(p) for u, p in st["peers"].items()}
            srv._masked = dict(st["masked"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _state_error("server", exc) from None
        return srv


# ---------------------------------------------------------------- in-process driver


def run_secure_sum_session(vectors_per_round: list[dict[str, np.ndarray]], threshold: int,
                           bits: int, drop: dict[int, set[str]] | None = None, *,
                           silent_in_unmask: dict[int, set[str]] | None = None,
                           job_id: str | None = None) -> list[np.ndarray]:
    """Run a whole job in one process; per round, the sum of that round's survivors.

    Rounds are numbered from 1 (`vectors_per_round[0]` is round 1). `drop[r]` sites send no
    masked input in round r and are dropped for good; `silent_in_unmask[r]` sites mask but do
    not answer round r's unmask request. Every message goes through `to_str()`/`from_str()` and
    every client and server call through state export/import, just as in the stateless
    per-site calls.
    """
    if not vectors_per_round:
        raise SecAggRoundError("no rounds given")
    sites = sorted(set().union(*vectors_per_round))
    if not sites:
        raise SecAggThresholdError("no sites given")
    rounds = len(vectors_per_round)
    drop = {r: set(s) for r, s in (drop or {}).items()}
    silent = {r: set(s) for r, s in (silent_in_unmask or {}).items()}
    for name, plan in (("drop", drop), ("silent_in_unmask", silent)):
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

    def step(site: str, call: Callable[[SecAggSessionClient], _Message]) -> str:
        client = SecAggSessionClient.from_state(states[site])
        out = call(client).to_str()
        states[site] = client.export_state()
        return out

    adverts = [step(s, lambda c: c.advertise()) for s in sites]
    directory = serve(lambda v: v.collect_keys(adverts).to_str())
    shares = [step(s, lambda c: c.share(directory)) for s in sites]
    serve(lambda v: v.route_shares(shares))
    sums = []
    for r, vectors in enumerate(vectors_per_round, start=1):
        live = [s for s in serve(lambda v: v.active) if s not in drop.get(r, set())]
        missing = sorted(s for s in live if s not in vectors)
        if missing:
            raise SecAggLengthError(f"round {r}: no vector for active sites {missing}")
        masked = [step(s, lambda c, s=s, r=r, x=vectors: c.masked_input(r, x[s])) for s in live]
        request = serve(lambda v, r=r, m=masked: v.collect_masked(r, m).to_str())
        answers = []
        for s in live:
            if s in silent.get(r, set()):
                continue
            box = serve(lambda v, s=s: v.inbox(s).to_str())
            answers.append(step(s, lambda c, r=r, q=request, b=box: c.unmask(r, q, b)))
        sums.append(serve(lambda v, r=r, a=answers: v.unmask(r, a)))
    return sums
