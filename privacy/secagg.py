"""Secure sum of integer vectors mod 2^bits, after Bonawitz et al., CCS 2017.

"Practical Secure Aggregation for Privacy-Preserving Machine Learning", semi-honest server
variant with dropout recovery. Every step is a pure call whose inputs/outputs are small
JSON-serialisable messages, because in production each step runs as a separate stateless call
at a site; the site keeps `SecAggClient.export_state()` locally between steps and the
orchestrator (`SecAggServer`) only relays messages it cannot read.

Rounds (U1 ⊇ U2 ⊇ U3 ⊇ U4 are the sites still answering):

0. AdvertiseKeys: two X25519 key pairs per site, c (encrypts site-to-site shares) and s
   (agrees pairwise mask seeds). Optionally signed by a caller-supplied Ed25519 callback.
1. ShareKeys: each site draws a self-mask seed b_u (32 bytes) and Shamir-shares b_u and its s
   secret key over U1 with threshold t. pycryptodome's Shamir works on 16-byte secrets over
   GF(2^128), so each 32-byte secret is split as two halves with independent polynomials; a
   share is the two half-shares at the same index (index = 1 + position in sorted U1).
   Shares for v are AES-256-GCM encrypted under HKDF-SHA256(X25519(c_sk_u, c_pk_v)) with the
   direction (u -> v) and job id in both the HKDF info and the associated data. The site also
   publishes SHA-256 commitments to b_u so the server can check what it reconstructs.
2. MaskedInput: y_u = x_u + PRG(b_u) + sum_{v in U2, u<v} PRG(s_uv) - sum_{v in U2, u>v}
   PRG(s_uv) mod 2^bits, s_uv = HKDF(X25519(s_sk_u, s_pk_v)). PRG = AES-256-CTR keystream
   read as little-endian uint64 and reduced mod 2^bits (2^bits divides 2^64, so uniform).
3. Unmasking: for the survivors U3 each site reveals its shares of b_v; for the dropped
   U2 \\ U3 its shares of s_sk_v - never both for one peer (that would unmask x_v), and it
   remembers what it revealed so a second, contradicting request is refused too.

Threat model and limits: semi-honest server and up to t-1 colluding sites. Without signatures
(and a PKI to check them) a malicious server could substitute keys; without the paper's
ConsistencyCheck round it could send different U3 views to different sites. Use
t > n/2 (`default_threshold`) if the server may deviate. The exported client state holds the
site's secrets: store it like a private key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = "fedsyft-secagg-v1"
_NONCE = 12
_KEY = 32

SignFn = Callable[[bytes], bytes]
VerifyFn = Callable[[str, bytes, bytes], bool]


# ---------------------------------------------------------------- errors


class SecAggError(ValueError):
    """Base class for every secure-aggregation failure."""


class SecAggThresholdError(SecAggError):
    """Fewer sites answered than the reconstruction threshold allows."""


class SecAggLengthError(SecAggError):
    """A vector has the wrong length for this job."""


class SecAggModulusError(SecAggError):
    """A vector uses another modulus, or holds values that are not residues mod 2^bits."""


class SecAggUnknownSenderError(SecAggError):
    """A message names a site that is not a participant of this round."""


class SecAggDecryptionError(SecAggError):
    """AES-GCM authentication failed: ciphertext tampered with, misrouted, or wrong key."""


class SecAggMessageError(SecAggError):
    """Malformed message, wrong job id, duplicate or missing entries."""


class SecAggProtocolError(SecAggError):
    """Step called out of order, or a retry that differs from the first call."""


class SecAggUnmaskRefusedError(SecAggProtocolError):
    """A site refused to reveal both b_v and s_sk_v shares of the same peer v."""


class SecAggReconstructionError(SecAggError):
    """A reconstructed secret does not match its published commitment / public key."""


class SecAggSignatureError(SecAggError):
    """A key advertisement is unsigned or its signature does not verify."""


# ---------------------------------------------------------------- primitives


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(text: Any, what: str, size: int | None = None) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise SecAggMessageError(f"{what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise SecAggMessageError(f"{what} has {len(data)} bytes, expected {size}")
    return data


def _label(*parts: str) -> bytes:
    """Unambiguous domain-separation string (JSON list, so no concatenation collisions)."""
    return json.dumps([PROTOCOL, *parts], separators=(",", ":")).encode()


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY, salt=None, info=info).derive(ikm)


def _mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def _prg_u64(seed: bytes, length: int) -> np.ndarray:
    """AES-256-CTR keystream as `length` uint64 (mod 2^64). Each seed is used once per job."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * length)), dtype="<u8")


def prg_vector(seed: bytes, length: int, bits: int) -> np.ndarray:
    """Expand a 32-byte seed into `length` uniform residues mod 2^bits (uint64)."""
    if len(seed) != _KEY:
        raise SecAggError(f"PRG seed must be {_KEY} bytes, got {len(seed)}")
    return _prg_u64(seed, length).astype(np.uint64) & _mask(bits)


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _exchange(sk: X25519PrivateKey, peer_pk: bytes, peer: str) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError:
        raise SecAggMessageError(f"public key of site {peer!r} is invalid (low order)") from None


def _pair_seed(s_sk: X25519PrivateKey, peer_s_pk: bytes, job_id: str, a: str, b: str) -> bytes:
    """Seed shared by sites a (owner of s_sk) and b (owner of peer_s_pk), symmetric in a, b."""
    lo, hi = sorted((a, b))
    return _hkdf(_exchange(s_sk, peer_s_pk, b), _label("pair-mask", job_id, lo, hi))


def _self_seed(b: bytes, job_id: str, site: str) -> bytes:
    return _hkdf(b, _label("self-mask", job_id, site))


def _commit(b: bytes, job_id: str, site: str) -> bytes:
    return hashlib.sha256(_label("b-commit", job_id, site) + b).digest()


def _share_aad(job_id: str, sender: str, recipient: str) -> bytes:
    return _label("share-keys", job_id, sender, recipient)


def _share_key(c_sk: X25519PrivateKey, peer_c_pk: bytes, peer: str, job_id: str,
               sender: str, recipient: str) -> bytes:
    return _hkdf(_exchange(c_sk, peer_c_pk, peer), _label("share-enc", job_id, sender, recipient))


def _split32(secret: bytes, k: int, n: int) -> list[bytes]:
    """Shamir-share 32 bytes as two independent 16-byte sharings; item i has index i + 1."""
    lo, hi = Shamir.split(k, n, secret[:16]), Shamir.split(k, n, secret[16:])
    return [a[1] + b[1] for a, b in zip(lo, hi, strict=True)]


def _combine32(shares: list[tuple[int, bytes]]) -> bytes:
    lo = Shamir.combine([(i, s[:16]) for i, s in shares])
    hi = Shamir.combine([(i, s[16:]) for i, s in shares])
    return lo + hi


def _pack(values: np.ndarray, bits: int) -> str:
    """ceil(bits/8) little-endian bytes per value: halves messages for bits <= 32."""
    nbytes = (bits + 7) // 8
    raw = np.ascontiguousarray(values, dtype="<u8").view(np.uint8).reshape(-1, 8)[:, :nbytes]
    return _b64e(raw.tobytes())


def _unpack(data: str, bits: int, length: int, who: str) -> np.ndarray:
    nbytes = (bits + 7) // 8
    raw = _b64d(data, f"masked vector of site {who!r}")
    if len(raw) != length * nbytes:
        raise SecAggLengthError(
            f"masked vector of site {who!r} has {len(raw)} bytes = {len(raw) / nbytes:g} values "
            f"of {nbytes} bytes, expected {length} values"
        )
    buf = np.zeros((length, 8), dtype=np.uint8)
    buf[:, :nbytes] = np.frombuffer(raw, dtype=np.uint8).reshape(length, nbytes)
    out = buf.view("<u8").reshape(length).astype(np.uint64)
    if bits < 64 and (out > _mask(bits)).any():
        raise SecAggModulusError(f"masked vector of site {who!r} holds values >= 2^{bits}")
    return out


def _as_residues(x: Any, bits: int, length: int, who: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise SecAggLengthError(f"site {who!r}: input has shape {arr.shape}, expected ({length},)")
    if arr.dtype.kind not in "ui":
        raise SecAggModulusError(
            f"site {who!r}: input dtype {arr.dtype} is not an integer type; "
            "fixed-point encode it to residues mod 2^bits first"
        )
    if arr.dtype.kind == "i" and (arr < 0).any():
        i = int(np.argmax(arr < 0))
        raise SecAggModulusError(
            f"site {who!r}: value {int(arr[i])} at index {i} is negative; "
            f"reduce mod 2^{bits} (two's complement) first"
        )
    arr = arr.astype(np.uint64)
    if bits < 64 and (arr > _mask(bits)).any():
        i = int(np.argmax(arr > _mask(bits)))
        raise SecAggModulusError(
            f"site {who!r}: value {int(arr[i])} at index {i} is not below 2^{bits}"
        )
    return arr


def _check_params(threshold: int, bits: int, vector_length: int) -> None:
    if not isinstance(threshold, int) or threshold < 2:
        raise SecAggThresholdError(f"threshold must be an integer >= 2, got {threshold!r}")
    if not isinstance(bits, int) or not 1 <= bits <= 64:
        raise SecAggModulusError(f"bits must be an integer in 1..64, got {bits!r}")
    if not isinstance(vector_length, int) or vector_length < 1:
        raise SecAggLengthError(f"vector_length must be a positive integer, got {vector_length!r}")


def _too_few(answered: int, total: int, threshold: int, step: str, missing: Iterable[str]) -> None:
    if answered < threshold:
        silent = ", ".join(sorted(missing)) or "-"
        raise SecAggThresholdError(
            f"only {answered} of {total} sites answered, threshold is {threshold} "
            f"(step {step}; silent: {silent})"
        )


def bits_for_sum(value_bits: int, n_sites: int) -> int:
    """Smallest modulus exponent so that a sum of n_sites values of value_bits cannot wrap.

    Works for unsigned values in [0, 2^value_bits) and for two's-complement values in
    [-2^(value_bits-1), 2^(value_bits-1)) alike: the sum needs ceil(log2 n_sites) extra bits.
    """
    if value_bits < 1 or n_sites < 1:
        raise SecAggError(f"need value_bits >= 1 and n_sites >= 1, got {value_bits}, {n_sites}")
    bits = value_bits + (n_sites - 1).bit_length()
    if bits > 64:
        raise SecAggModulusError(
            f"{n_sites} sites x {value_bits}-bit values need {bits} bits, more than 64; "
            "lower the fixed-point precision"
        )
    return bits


def default_threshold(n_sites: int) -> int:
    """Honest majority t = floor(n/2) + 1 (>= 2): tolerates n - t dropouts."""
    if n_sites < 2:
        raise SecAggThresholdError(f"secure sum needs at least 2 sites, got {n_sites}")
    return max(2, n_sites // 2 + 1)


def key_advert_payload(job_id: str, site_id: str, c_pk: str, s_pk: str) -> bytes:
    """Bytes a site signs (e.g. with Ed25519) to authenticate its AdvertiseKeys message."""
    return _label("advertise-keys", job_id, site_id, c_pk, s_pk)


# ---------------------------------------------------------------- messages

M = TypeVar("M", bound="_Message")


def _want(cond: bool, kind: str, what: str) -> None:
    if not cond:
        raise SecAggMessageError(f"{kind} message: {what}")


def _is_str_map(obj: Any) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
    )


def _is_str_list(obj: Any) -> bool:
    return isinstance(obj, list) and all(isinstance(v, str) for v in obj)


@dataclass(frozen=True)
class _Message:
    """JSON message: `to_str()` / `from_str()` so each step can cross a process boundary."""

    KIND = ""

    def to_str(self) -> str:
        body = {"kind": self.KIND, "protocol": PROTOCOL, **asdict(self)}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_str(cls: type[M], text: str) -> M:
        try:
            body = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise SecAggMessageError(f"{cls.KIND} message is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise SecAggMessageError(f"{cls.KIND} message is not a JSON object")
        kind, proto = body.pop("kind", None), body.pop("protocol", None)
        if kind != cls.KIND or proto != PROTOCOL:
            raise SecAggMessageError(
                f"expected a {cls.KIND!r} message of {PROTOCOL}, got kind={kind!r} "
                f"protocol={proto!r}"
            )
        names = {f.name for f in fields(cls)}
        if set(body) != names:
            raise SecAggMessageError(
                f"{cls.KIND} message: missing {sorted(names - set(body))}, "
                f"unexpected {sorted(set(body) - names)}"
            )
        msg = cls(**body)
        msg.check()
        return msg

    @classmethod
    def coerce(cls: type[M], msg: M | str) -> M:
        if isinstance(msg, str):
            return cls.from_str(msg)
        if isinstance(msg, cls):
            msg.check()
            return msg
        raise SecAggMessageError(f"expected {cls.__name__} or its string, got {type(msg).__name__}")

    def check(self) -> None:
        """Type-check fields (messages arrive from other processes)."""
        _want(isinstance(getattr(self, "job_id", None), str), self.KIND, "job_id must be a string")


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Round 0, site -> server: the site's two X25519 public keys (base64)."""

    KIND = "advertise_keys"
    job_id: str
    sender: str
    c_pk: str
    s_pk: str
    signature: str | None = None

    def check(self) -> None:
        super().check()
        _want(isinstance(self.sender, str) and bool(self.sender), self.KIND, "bad sender")
        _b64d(self.c_pk, f"c_pk of site {self.sender!r}", _KEY)
        _b64d(self.s_pk, f"s_pk of site {self.sender!r}", _KEY)
        if self.signature is not None:
            _b64d(self.signature, f"signature of site {self.sender!r}")


@dataclass(frozen=True)
class KeyDirectory(_Message):
    """Round 0, server -> all: job parameters and every site's public keys."""

    KIND = "key_directory"
    job_id: str
    threshold: int
    bits: int
    vector_length: int
    keys: dict[str, dict[str, str | None]]

    def check(self) -> None:
        super().check()
        for name in ("threshold", "bits", "vector_length"):
            _want(type(getattr(self, name)) is int, self.KIND, f"{name} must be an integer")
        _want(isinstance(self.keys, dict), self.KIND, "keys must be an object")
        for site, entry in self.keys.items():
            _want(isinstance(entry, dict) and {"c_pk", "s_pk", "signature"} == set(entry),
                  self.KIND, f"entry of site {site!r} needs c_pk, s_pk, signature")
            _b64d(entry["c_pk"], f"c_pk of site {site!r}", _KEY)
            _b64d(entry["s_pk"], f"s_pk of site {site!r}", _KEY)


@dataclass(frozen=True)
class EncryptedShares(_Message):
    """Round 1, site -> server: AES-GCM ciphertexts (nonce || ct) per recipient."""

    KIND = "encrypted_shares"
    job_id: str
    sender: str
    b_commitment: str
    ciphertexts: dict[str, str]

    def check(self) -> None:
        super().check()
        _want(isinstance(self.sender, str), self.KIND, "bad sender")
        _b64d(self.b_commitment, f"b commitment of site {self.sender!r}", 32)
        _want(_is_str_map(self.ciphertexts), self.KIND, "ciphertexts must map site -> base64")


@dataclass(frozen=True)
class SharesInbox(_Message):
    """Round 1, server -> one site: U2 and the ciphertexts addressed to that site."""

    KIND = "shares_inbox"
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
class MaskedInput(_Message):
    """Round 2, site -> server: y_u packed as ceil(bits/8) little-endian bytes per value."""

    KIND = "masked_input"
    job_id: str
    sender: str
    bits: int
    vector_length: int
    data: str

    def check(self) -> None:
        super().check()
        _want(isinstance(self.sender, str), self.KIND, "bad sender")
        _want(type(self.bits) is int and 1 <= self.bits <= 64, self.KIND, "bits must be 1..64")
        _want(type(self.vector_length) is int, self.KIND, "vector_length must be an integer")
        _want(isinstance(self.data, str), self.KIND, "data must be a base64 string")

    def values(self) -> np.ndarray:
        """The masked vector (uint64 residues mod 2^bits)."""
        return _unpack(self.data, self.bits, self.vector_length, self.sender)


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Round 3, server -> survivors: who survived (reveal b) and who dropped (reveal s_sk)."""

    KIND = "unmask_request"
    job_id: str
    survivors: list[str]
    dropped: list[str]

    def check(self) -> None:
        super().check()
        _want(_is_str_list(self.survivors) and _is_str_list(self.dropped), self.KIND,
              "survivors and dropped must be lists of site ids")


@dataclass(frozen=True)
class UnmaskShares(_Message):
    """Round 3, site -> server: its shares of b_v (survivors) and s_sk_v (dropped)."""

    KIND = "unmask_shares"
    job_id: str
    sender: str
    b_shares: dict[str, str]
    sk_shares: dict[str, str]

    def check(self) -> None:
        super().check()
        _want(isinstance(self.sender, str), self.KIND, "bad sender")
        _want(_is_str_map(self.b_shares) and _is_str_map(self.sk_shares), self.KIND,
              "b_shares and sk_shares must map site -> base64")


# ---------------------------------------------------------------- client


class SecAggClient:
    """One site's side of the protocol; `export_state()` between steps, `from_state()` to resume.

    Order: advertise_keys -> share_keys -> masked_input -> unmask. Retrying a step with the
    same inputs returns the same answer; retrying with different inputs is refused, because
    two masked inputs under the same masks leak their difference.
    """

    def __init__(self, site_id: str, *, job_id: str, threshold: int, bits: int,
                 vector_length: int) -> None:
        _check_params(threshold, bits, vector_length)
        if not isinstance(site_id, str) or not site_id:
            raise SecAggMessageError(f"site_id must be a non-empty string, got {site_id!r}")
        self.site_id, self.job_id = site_id, job_id
        self.threshold, self.bits, self.vector_length = threshold, bits, vector_length
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._phase = "keys"
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # U1: site -> (c_pk, s_pk)
        self._b: bytes | None = None
        self._dir_digest = ""
        self._share_msg = ""
        self._shares: dict[str, tuple[bytes, bytes]] = {}  # sender -> (b share, s_sk share)
        self._u2: list[str] = []
        self._input_digest = ""
        self._revealed_b: set[str] = set()
        self._revealed_sk: set[str] = set()

    # -- round 0
    def advertise_keys(self, sign: SignFn | None = None) -> AdvertiseKeys:
        """Public keys for the server to collect; `sign(payload) -> signature` is optional."""
        c_pk, s_pk = _b64e(_pub(self._c_sk)), _b64e(_pub(self._s_sk))
        sig = None
        if sign is not None:
            sig = _b64e(sign(key_advert_payload(self.job_id, self.site_id, c_pk, s_pk)))
        return AdvertiseKeys(self.job_id, self.site_id, c_pk, s_pk, sig)

    # -- round 1
    def share_keys(self, directory: KeyDirectory | str,
                   verify: VerifyFn | None = None) -> EncryptedShares:
        """Shamir-share b_u and s_sk_u over U1 and encrypt each recipient's shares."""
        d = KeyDirectory.coerce(directory)
        digest = hashlib.sha256(d.to_str().encode()).hexdigest()
        if self._phase != "keys":
            if self._phase == "shared" and digest == self._dir_digest:
                return EncryptedShares.from_str(self._share_msg)
            raise SecAggProtocolError(
                f"site {self.site_id!r} already shared its keys for job {self.job_id!r} "
                "under another key directory"
            )
        self._check_job(d.job_id, "key directory")
        params = (d.threshold, d.bits, d.vector_length)
        mine = (self.threshold, self.bits, self.vector_length)
        if params != mine:
            raise SecAggMessageError(
                f"site {self.site_id!r}: key directory says (threshold, bits, length)={params}, "
                f"this site was configured with {mine}"
            )
        if self.site_id not in d.keys:
            raise SecAggUnknownSenderError(f"key directory does not list site {self.site_id!r}")
        own = d.keys[self.site_id]
        if (own["c_pk"], own["s_pk"]) != (_b64e(_pub(self._c_sk)), _b64e(_pub(self._s_sk))):
            raise SecAggMessageError(
                f"key directory lists other keys for site {self.site_id!r} (key substitution?)"
            )
        if len(d.keys) < self.threshold:
            raise SecAggThresholdError(
                f"key directory lists only {len(d.keys)} sites, threshold is {self.threshold}"
            )
        if verify is not None:
            for site, e in d.keys.items():
                payload = key_advert_payload(d.job_id, site, e["c_pk"], e["s_pk"])
                sig = e["signature"]
                if sig is None or not verify(site, payload, _b64d(sig, f"signature of {site!r}")):
                    raise SecAggSignatureError(f"key advertisement of site {site!r} is not "
                                               "signed or its signature does not verify")
        u1 = sorted(d.keys)
        self._keys = {s: (_b64d(d.keys[s]["c_pk"], "c_pk"), _b64d(d.keys[s]["s_pk"], "s_pk"))
                      for s in u1}
        self._b = secrets.token_bytes(_KEY)
        b_sh = _split32(self._b, self.threshold, len(u1))
        sk_sh = _split32(self._s_sk.private_bytes_raw(), self.threshold, len(u1))
        cts: dict[str, str] = {}
        for i, v in enumerate(u1):
            if v == self.site_id:
                self._shares[v] = (b_sh[i], sk_sh[i])
                continue
            plain = json.dumps({"index": i + 1, "b": _b64e(b_sh[i]), "sk": _b64e(sk_sh[i])})
            key = _share_key(self._c_sk, self._keys[v][0], v, self.job_id, self.site_id, v)
            nonce = secrets.token_bytes(_NONCE)
            aad = _share_aad(self.job_id, self.site_id, v)
            ct = AESGCM(key).encrypt(nonce, plain.encode(), aad)
            cts[v] = _b64e(nonce + ct)
        msg = EncryptedShares(self.job_id, self.site_id,
                              _b64e(_commit(self._b, self.job_id, self.site_id)), cts)
        self._phase, self._dir_digest, self._share_msg = "shared", digest, msg.to_str()
        return msg

    # -- round 2
    def masked_input(self, inbox: SharesInbox | str, x: np.ndarray) -> MaskedInput:
        """Decrypt (authenticate) the relayed shares, then mask x with self and pairwise masks."""
        box = SharesInbox.coerce(inbox)
        if self._phase not in ("shared", "masked"):
            raise SecAggProtocolError(
                f"site {self.site_id!r}: masked_input before share_keys (phase {self._phase!r})"
            )
        self._check_job(box.job_id, "shares inbox")
        if box.recipient != self.site_id:
            raise SecAggMessageError(
                f"shares inbox for site {box.recipient!r} delivered to site {self.site_id!r}"
            )
        u2 = sorted(set(box.senders))
        unknown = sorted(set(u2) - set(self._keys))
        if unknown:
            raise SecAggUnknownSenderError(
                f"site {self.site_id!r}: shares inbox lists unknown sites {unknown}"
            )
        if self.site_id not in u2:
            raise SecAggMessageError(f"shares inbox omits the recipient {self.site_id!r} from U2")
        _too_few(len(u2), len(self._keys), self.threshold, "ShareKeys", set(self._keys) - set(u2))
        peers = [v for v in u2 if v != self.site_id]
        extra = sorted(set(box.ciphertexts) - set(peers))
        if extra:
            raise SecAggUnknownSenderError(
                f"site {self.site_id!r}: ciphertexts from sites {extra} not in U2 {u2}"
            )
        missing = sorted(set(peers) - set(box.ciphertexts))
        if missing:
            raise SecAggMessageError(f"site {self.site_id!r}: no ciphertext from sites {missing}")
        xs = _as_residues(x, self.bits, self.vector_length, self.site_id)
        digest = hashlib.sha256(xs.astype("<u8").tobytes()).hexdigest()
        if self._phase == "masked" and (digest, u2) != (self._input_digest, self._u2):
            raise SecAggProtocolError(
                f"site {self.site_id!r} already sent a masked input for job {self.job_id!r}; "
                "masking another input or peer set would leak the difference"
            )
        received = {v: self._decrypt(v, box.ciphertexts[v]) for v in peers}
        assert self._b is not None
        acc = xs.copy()
        acc += _prg_u64(_self_seed(self._b, self.job_id, self.site_id), self.vector_length)
        for v in peers:
            seed = _pair_seed(self._s_sk, self._keys[v][1], self.job_id, self.site_id, v)
            if self.site_id < v:
                acc += _prg_u64(seed, self.vector_length)
            else:
                acc -= _prg_u64(seed, self.vector_length)
        acc &= _mask(self.bits)
        self._shares.update(received)
        self._phase, self._u2, self._input_digest = "masked", u2, digest
        return MaskedInput(self.job_id, self.site_id, self.bits, self.vector_length,
                           _pack(acc, self.bits))

    def _decrypt(self, sender: str, blob: str) -> tuple[bytes, bytes]:
        raw = _b64d(blob, f"ciphertext from site {sender!r}")
        key = _share_key(self._c_sk, self._keys[sender][0], sender, self.job_id,
                         sender, self.site_id)
        try:
            plain = AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:],
                                        _share_aad(self.job_id, sender, self.site_id))
        except (InvalidTag, ValueError):
            raise SecAggDecryptionError(
                f"site {self.site_id!r}: shares relayed from site {sender!r} failed AES-GCM "
                "authentication (tampered, misrouted or encrypted for another job)"
            ) from None
        body = json.loads(plain)
        expected = sorted(self._keys).index(self.site_id) + 1
        if body.get("index") != expected:
            raise SecAggMessageError(
                f"site {self.site_id!r}: shares from {sender!r} carry index {body.get('index')}, "
                f"expected {expected}"
            )
        return (_b64d(body["b"], "b share", _KEY), _b64d(body["sk"], "sk share", _KEY))

    # -- round 3
    def unmask(self, request: UnmaskRequest | str) -> UnmaskShares:
        """Reveal b-shares of survivors and s_sk-shares of dropped sites, never both for one."""
        req = UnmaskRequest.coerce(request)
        if self._phase != "masked":
            raise SecAggProtocolError(
                f"site {self.site_id!r}: unmask before masked_input (phase {self._phase!r})"
            )
        self._check_job(req.job_id, "unmask request")
        surv, drop = set(req.survivors), set(req.dropped)
        both = sorted(surv & drop) or sorted((surv & self._revealed_sk) | (drop & self._revealed_b))
        if both:
            raise SecAggUnmaskRefusedError(
                f"site {self.site_id!r} refuses to reveal both the self-mask seed and the mask "
                f"key of sites {both}: that would unmask their inputs"
            )
        unknown = sorted((surv | drop) - set(self._u2))
        if unknown:
            raise SecAggUnknownSenderError(
                f"site {self.site_id!r}: unmask request names sites {unknown} outside U2"
            )
        if surv | drop != set(self._u2):
            raise SecAggMessageError(
                f"unmask request leaves sites {sorted(set(self._u2) - surv - drop)} unclassified"
            )
        if self.site_id not in surv:
            raise SecAggProtocolError(
                f"site {self.site_id!r} is listed as dropped but was asked to unmask"
            )
        _too_few(len(surv), len(self._u2), self.threshold, "MaskedInput", drop)
        self._revealed_b |= surv
        self._revealed_sk |= drop
        return UnmaskShares(
            self.job_id, self.site_id,
            {v: _b64e(self._shares[v][0]) for v in sorted(surv)},
            {v: _b64e(self._shares[v][1]) for v in sorted(drop)},
        )

    def _check_job(self, job_id: str, what: str) -> None:
        if job_id != self.job_id:
            raise SecAggMessageError(
                f"site {self.site_id!r}: {what} is for job {job_id!r}, not {self.job_id!r}"
            )

    # -- state
    def export_state(self) -> str:
        """All client state as JSON (holds secret keys: keep it at the site, never relay it)."""
        return json.dumps({
            "kind": "secagg_client_state", "protocol": PROTOCOL,
            "site_id": self.site_id, "job_id": self.job_id, "threshold": self.threshold,
            "bits": self.bits, "vector_length": self.vector_length, "phase": self._phase,
            "c_sk": _b64e(self._c_sk.private_bytes_raw()),
            "s_sk": _b64e(self._s_sk.private_bytes_raw()),
            "keys": {s: [_b64e(c), _b64e(p)] for s, (c, p) in self._keys.items()},
            "b": _b64e(self._b) if self._b is not None else None,
            "dir_digest": self._dir_digest, "share_msg": self._share_msg,
            "shares": {s: [_b64e(b), _b64e(k)] for s, (b, k) in self._shares.items()},
            "u2": self._u2, "input_digest": self._input_digest,
            "revealed_b": sorted(self._revealed_b), "revealed_sk": sorted(self._revealed_sk),
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_state(cls, state: str) -> SecAggClient:
        """Resume a client from `export_state()` output."""
        try:
            st = json.loads(state)
            if st.get("kind") != "secagg_client_state" or st.get("protocol") != PROTOCOL:
                raise SecAggMessageError(f"not a {PROTOCOL} client state")
            client = cls.__new__(cls)
            client.site_id, client.job_id = st["site_id"], st["job_id"]
            client.threshold, client.bits = st["threshold"], st["bits"]
            client.vector_length = st["vector_length"]
            _check_params(client.threshold, client.bits, client.vector_length)
            client._phase = st["phase"]
            client._c_sk = X25519PrivateKey.from_private_bytes(_b64d(st["c_sk"], "c_sk", _KEY))
            client._s_sk = X25519PrivateKey.from_private_bytes(_b64d(st["s_sk"], "s_sk", _KEY))
            client._keys = {s: (_b64d(c, "c_pk", _KEY), _b64d(p, "s_pk", _KEY))
                            for s, (c, p) in st["keys"].items()}
            client._b = _b64d(st["b"], "b", _KEY) if st["b"] is not None else None
            client._dir_digest, client._share_msg = st["dir_digest"], st["share_msg"]
            client._shares = {s: (_b64d(b, "b share", _KEY), _b64d(k, "sk share", _KEY))
                              for s, (b, k) in st["shares"].items()}
            client._u2, client._input_digest = list(st["u2"]), st["input_digest"]
            client._revealed_b = set(st["revealed_b"])
            client._revealed_sk = set(st["revealed_sk"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, SecAggError):
                raise
            raise SecAggMessageError(f"corrupt secure-aggregation client state ({exc!r})") from None
        return client


# ---------------------------------------------------------------- server


def collect_messages(cls: type[M], messages: Iterable[M | str], job_id: str,
                     participants: Iterable[str] | None, step: str) -> dict[str, M]:
    """Parse one step's messages into sender -> message, rejecting wrong job, outsiders, dups.

    Shared by every server of this package (single-shot and multi-round), so the checks on
    what a site sends stay identical.
    """
    allowed = set(participants) if participants is not None else None
    out: dict[str, M] = {}
    for raw in messages:
        msg = cls.coerce(raw)
        sender = msg.sender  # type: ignore[attr-defined]
        if msg.job_id != job_id:
            raise SecAggMessageError(
                f"{step} from site {sender!r} is for job {msg.job_id!r}, not {job_id!r}"
            )
        if allowed is not None and sender not in allowed:
            raise SecAggUnknownSenderError(
                f"{step} from site {sender!r}, which is not a participant of this step "
                f"(expected one of {sorted(allowed)})"
            )
        if sender in out:
            raise SecAggMessageError(f"duplicate {step} from site {sender!r}")
        out[sender] = msg
    return out


class SecAggServer:
    """Orchestrator side: relays ciphertexts, collects masked inputs, removes the masks.

    It learns only the sum of the surviving sites' inputs (and who dropped out).
    """

    def __init__(self, threshold: int, bits: int, vector_length: int, *,
                 job_id: str = "secagg", sites: Iterable[str] | None = None) -> None:
        _check_params(threshold, bits, vector_length)
        self.threshold, self.bits, self.vector_length = threshold, bits, vector_length
        self.job_id = job_id
        self.sites = sorted(sites) if sites is not None else None
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._commitments: dict[str, bytes] = {}
        self._u2: list[str] = []
        self._masked: dict[str, np.ndarray] = {}
        self._dropped: list[str] = []

    @property
    def survivors(self) -> list[str]:
        """Sites whose masked input is part of the sum (U3)."""
        return sorted(self._masked)

    @property
    def dropped(self) -> list[str]:
        """Sites that shared keys but sent no masked input (U2 \\ U3)."""
        return list(self._dropped)

    def _collect(self, cls: type[M], messages: Iterable[M | str],
                 participants: Iterable[str] | None, step: str) -> dict[str, M]:
        return collect_messages(cls, messages, self.job_id, participants, step)

    def collect_keys(self, adverts: Iterable[AdvertiseKeys | str]) -> KeyDirectory:
        """Round 0: build the key directory (U1) to broadcast to every site."""
        got = self._collect(AdvertiseKeys, adverts, self.sites, "AdvertiseKeys")
        total = len(self.sites) if self.sites is not None else len(got)
        _too_few(len(got), total, self.threshold, "AdvertiseKeys", set(self.sites or ()) - set(got))
        self._keys = {s: (_b64d(m.c_pk, "c_pk"), _b64d(m.s_pk, "s_pk"))
                      for s, m in sorted(got.items())}
        keys = {s: {"c_pk": m.c_pk, "s_pk": m.s_pk, "signature": m.signature}
                for s, m in sorted(got.items())}
        return KeyDirectory(self.job_id, self.threshold, self.bits, self.vector_length, keys)

    def route_shares(self, messages: Iterable[EncryptedShares | str]) -> dict[str, SharesInbox]:
        """Round 1: fix U2 and hand each site the (opaque) ciphertexts addressed to it."""
        if not self._keys:
            raise SecAggProtocolError("route_shares before collect_keys")
        got = self._collect(EncryptedShares, messages, self._keys, "ShareKeys")
        _too_few(len(got), len(self._keys), self.threshold, "ShareKeys", set(self._keys) - set(got))
        for u, msg in got.items():
            want = set(self._keys) - {u}
            extra = sorted(set(msg.ciphertexts) - want)
            if extra:
                raise SecAggUnknownSenderError(f"site {u!r} encrypted shares for unknown {extra}")
            if set(msg.ciphertexts) != want:
                raise SecAggMessageError(
                    f"site {u!r} sent no shares for {sorted(want - set(msg.ciphertexts))}"
                )
            self._commitments[u] = _b64d(msg.b_commitment, "b commitment", 32)
        self._u2 = sorted(got)
        return {
            v: SharesInbox(self.job_id, v, self._u2,
                           {u: got[u].ciphertexts[v] for u in self._u2 if u != v})
            for v in self._u2
        }

    def collect_masked(self, messages: Iterable[MaskedInput | str]) -> UnmaskRequest:
        """Round 2: validate masked inputs, fix U3 and ask survivors for the unmasking shares."""
        if not self._u2:
            raise SecAggProtocolError("collect_masked before route_shares")
        got = self._collect(MaskedInput, messages, self._u2, "MaskedInput")
        masked = {}
        for u, msg in got.items():
            if msg.bits != self.bits:
                raise SecAggModulusError(
                    f"site {u!r} masked modulo 2^{msg.bits}, this job sums modulo 2^{self.bits}"
                )
            if msg.vector_length != self.vector_length:
                raise SecAggLengthError(
                    f"site {u!r} sent {msg.vector_length} values, this job has "
                    f"{self.vector_length}"
                )
            masked[u] = msg.values()
        _too_few(len(got), len(self._u2), self.threshold, "MaskedInput", set(self._u2) - set(got))
        self._masked = masked
        self._dropped = sorted(set(self._u2) - set(got))
        return UnmaskRequest(self.job_id, self.survivors, self.dropped)

    def unmask(self, responses: Iterable[UnmaskShares | str]) -> np.ndarray:
        """Round 3: reconstruct b_v (survivors) and s_sk_v (dropped), return the sum mod 2^bits."""
        if not self._masked:
            raise SecAggProtocolError("unmask before collect_masked")
        u3, dropped = self.survivors, self._dropped
        got = self._collect(UnmaskShares, responses, u3, "Unmasking")
        _too_few(len(got), len(u3), self.threshold, "Unmasking", set(u3) - set(got))
        for w, msg in got.items():
            if set(msg.b_shares) != set(u3) or set(msg.sk_shares) != set(dropped):
                raise SecAggMessageError(
                    f"site {w!r} answered for b={sorted(msg.b_shares)}, "
                    f"sk={sorted(msg.sk_shares)}; expected b={u3}, sk={dropped}"
                )
        index = {s: i + 1 for i, s in enumerate(sorted(self._keys))}
        chosen = sorted(got)[: self.threshold]

        def rebuild(v: str, field: str) -> bytes:
            shares = [(index[w], _b64d(getattr(got[w], field)[v], f"share from {w!r}", _KEY))
                      for w in chosen]
            return _combine32(shares)

        n = self.vector_length
        total = np.zeros(n, dtype=np.uint64)
        for u in u3:
            total += self._masked[u]
            b = rebuild(u, "b_shares")
            if not hmac.compare_digest(_commit(b, self.job_id, u), self._commitments[u]):
                raise SecAggReconstructionError(
                    f"self-mask seed of site {u!r} rebuilt from {chosen} does not match its "
                    "commitment (corrupted shares)"
                )
            total -= _prg_u64(_self_seed(b, self.job_id, u), n)
        for v in dropped:
            sk = X25519PrivateKey.from_private_bytes(rebuild(v, "sk_shares"))
            if _pub(sk) != self._keys[v][1]:
                raise SecAggReconstructionError(
                    f"mask key of dropped site {v!r} rebuilt from {chosen} does not match its "
                    "public key (corrupted shares)"
                )
            for u in u3:  # u added +PRG(s_uv) if u < v, else -PRG(s_uv)
                stream = _prg_u64(_pair_seed(sk, self._keys[u][1], self.job_id, v, u), n)
                if u < v:
                    total -= stream
                else:
                    total += stream
        return total & _mask(self.bits)


# ---------------------------------------------------------------- in-process driver


def run_secure_sum(vectors: Mapping[str, np.ndarray], threshold: int, bits: int,
                   drop_after_sharing: Iterable[str] = (), *,
                   job_id: str | None = None) -> np.ndarray:
    """Run the full protocol in one process; sum of the non-dropped vectors mod 2^bits.

    Every step goes through `to_str()`/`from_str()` and client state export/import, exactly
    as the stateless per-site calls would. `drop_after_sharing` sites vanish after ShareKeys.
    """
    sites = sorted(vectors)
    drop = set(drop_after_sharing)
    if drop - set(sites):
        raise SecAggUnknownSenderError(f"cannot drop unknown sites {sorted(drop - set(sites))}")
    if not sites:
        raise SecAggThresholdError("no sites given")
    if np.ndim(vectors[sites[0]]) != 1:
        raise SecAggLengthError(f"vector of site {sites[0]!r} is not one-dimensional")
    length = len(vectors[sites[0]])
    job_id = job_id or secrets.token_hex(8)
    server = SecAggServer(threshold, bits, length, job_id=job_id, sites=sites)
    state = {s: SecAggClient(s, job_id=job_id, threshold=threshold, bits=bits,
                             vector_length=length).export_state() for s in sites}

    def step(site: str, call: Callable[[SecAggClient], _Message]) -> str:
        client = SecAggClient.from_state(state[site])
        out = call(client).to_str()
        state[site] = client.export_state()
        return out

    adverts = [step(s, lambda c: c.advertise_keys()) for s in sites]
    directory = server.collect_keys(adverts).to_str()
    shares = [step(s, lambda c: c.share_keys(directory)) for s in sites]
    inboxes = {s: m.to_str() for s, m in server.route_shares(shares).items()}
    live = [s for s in sites if s not in drop]
    masked = [step(s, lambda c, s=s: c.masked_input(inboxes[s], vectors[s])) for s in live]
    request = server.collect_masked(masked).to_str()
    answers = [step(s, lambda c: c.unmask(request)) for s in live]
    return server.unmask(answers)
