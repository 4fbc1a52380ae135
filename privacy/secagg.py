"""Building blocks of the secure sum (see `privacy.secagg_session` for the protocol).

Errors, the AES-256-CTR mask generator, X25519 agreement with HKDF, Shamir sharing of 32-byte
secrets (pycryptodome works on 16-byte secrets over GF(2^128), so each is split as two halves
with independent polynomials; share i is both halves at index i), packing of residues mod
2^bits, JSON messages that cross process boundaries, and the parameter rules (modulus for a
sum of n sites, honest-majority threshold).

PRG = AES-256-CTR keystream read as little-endian uint64 and reduced mod 2^bits (2^bits
divides 2^64, so the residues are uniform). Every seed is derived per job, round and pair,
and used once.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = "fedsyft-secagg-v2"
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


def collect_messages(cls: type[M], messages: Iterable[M | str], job_id: str,
                     participants: Iterable[str] | None, step: str) -> dict[str, M]:
    """Parse one step's messages into sender -> message, rejecting wrong job, outsiders, dups."""
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
