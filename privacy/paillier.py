"""Packed Paillier encryption of bounded float vectors, for secure summation.

Scheme: Paillier with g = n + 1 (``phe`` keys), so Enc(m) = (1 + m*n) * r^n mod n^2. Each
vector is fixed-point encoded (``FixedPointCodec``) and many encodings are packed into one
plaintext, ``slot_bits`` bits per slot, with enough room in every slot for the sum of
``max_summands`` encodings: adding ciphertexts then adds every slot independently, no carries.
One ciphertext thus carries ``floor((n.bit_length() - 2) / slot_bits)`` values instead of one.

Speed. The cost of encryption is the obfuscator r^n mod n^2 (a 2048-bit exponent modulo a
4096-bit number, ~10 ms). We compute obfuscators with ``gmpy2.powmod_base_list``, which
releases the GIL, in a ``ThreadPoolExecutor`` (one chunk per core): threads give the full
multi-core speed-up without the pickling, start-up and fork-safety costs of a process pool.
``ObfuscatorPool`` can precompute obfuscators (in a background thread, between rounds) so
that the online cost of encrypting is a few multiplications per ciphertext. We keep the
standard r^n with r uniform in Z_n^*; the faster DJN short-exponent variant needs an extra
hardness assumption and was deliberately not used.

Decryption goes through the small ``Decryptor`` protocol (``decrypt_raw`` on ciphertext ints)
so that threshold decryption can later replace ``CrtDecryptor`` without touching packing.
``CrtDecryptor`` is phe's CRT decryption (mod p^2 and q^2), batched and multi-threaded.

Not covered (needs zero-knowledge range proofs): a malicious contributor can encrypt values
outside the codec range and corrupt the sum. Decryption detects many such cases (bits set
beyond the packed slots, decoded values outside the possible range), not all of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import secrets
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import gmpy2
import numpy as np
from phe import paillier as _phe
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

from privacy.fixed_point import DecodingRangeError, FixedPointCodec

__all__ = [
    "CiphertextFormatError",
    "CrtDecryptor",
    "Decryptor",
    "EncryptedVector",
    "InsecureKeyError",
    "KeyFormatError",
    "KeyMismatchError",
    "LayoutMismatchError",
    "ObfuscatorPool",
    "PackedPaillier",
    "PackingLayout",
    "PaillierError",
    "PaillierPrivateKey",
    "PaillierPublicKey",
    "PlaintextOverflowError",
    "SummandOverflowError",
    "as_decryptor",
    "compute_obfuscators",
    "decrypt_vector",
    "fingerprint",
    "generate_keypair",
    "private_key_from_str",
    "private_key_to_str",
    "public_key_from_str",
    "public_key_to_str",
]

MIN_KEY_BITS = 2048
MIN_TEST_KEY_BITS = 512
SCHEME = "fedsyft-packed-paillier"
FORMAT_VERSION = 1
# Below this many exponentiations a thread pool costs more than it saves.
PARALLEL_THRESHOLD = 4

_PUB_KIND = "fedsyft-paillier-public"
_PRIV_KIND = "fedsyft-paillier-private"


class PaillierError(ValueError):
    """Base class of every error raised by this module."""


class InsecureKeyError(PaillierError):
    """Key shorter than 2048 bits without an explicit ``insecure_test_key=True``."""


class KeyFormatError(PaillierError):
    """A serialized key is malformed or inconsistent."""


class KeyMismatchError(PaillierError):
    """Ciphertext and key (or two ciphertexts) belong to different Paillier keys."""


class CiphertextFormatError(PaillierError):
    """A serialized encrypted vector is malformed, truncated or has invalid ciphertexts."""


class LayoutMismatchError(PaillierError):
    """Encrypted vectors use different packing layouts or lengths and cannot be combined."""


class SummandOverflowError(PaillierError):
    """More summands than the layout's slots can hold without overflowing."""


class PlaintextOverflowError(PaillierError):
    """A decrypted plaintext does not fit the packing layout (corrupted or out-of-range)."""


# --------------------------------------------------------------------------- keys


def _check_key_bits(n_bits: int, insecure_test_key: bool) -> None:
    if n_bits >= MIN_KEY_BITS:
        return
    if not insecure_test_key:
        raise InsecureKeyError(
            f"{n_bits}-bit Paillier key is below the {MIN_KEY_BITS}-bit minimum; "
            "pass insecure_test_key=True only in tests"
        )
    if n_bits < MIN_TEST_KEY_BITS:
        raise InsecureKeyError(f"{n_bits}-bit key is too small even for tests")


def generate_keypair(
    bits: int = 2048, *, insecure_test_key: bool = False
) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """Generate a Paillier key pair (2048 or 3072 bits; smaller only for tests)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise PaillierError(f"bits must be an int, got {bits!r}")
    _check_key_bits(bits, insecure_test_key)
    pub, priv = _phe.generate_paillier_keypair(n_length=bits)
    # phe picks p, q of the same size, which guarantees gcd(n, phi(n)) = 1; check anyway.
    if math.gcd(pub.n, (priv.p - 1) * (priv.q - 1)) != 1:  # pragma: no cover
        raise PaillierError("generated key has gcd(n, phi(n)) != 1; retry")
    return pub, priv


def fingerprint(public_key: PaillierPublicKey) -> str:
    """Short stable identifier of a public key: first 128 bits of sha256(n), hex."""
    n = public_key.n
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()[:32]


def public_key_to_str(public_key: PaillierPublicKey) -> str:
    """Serialize a public key as compact JSON with n in decimal."""
    return json.dumps(
        {"kind": _PUB_KIND, "v": FORMAT_VERSION, "n": str(public_key.n)}, separators=(",", ":")
    )


def private_key_to_str(private_key: PaillierPrivateKey) -> str:
    """Serialize a private key (n, p, q in decimal). Treat the result as a secret."""
    return json.dumps(
        {
            "kind": _PRIV_KIND,
            "v": FORMAT_VERSION,
            "n": str(private_key.public_key.n),
            "p": str(private_key.p),
            "q": str(private_key.q),
        },
        separators=(",", ":"),
    )


def _load_key_json(s: str, kind: str, fields: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(s, str):
        raise KeyFormatError(f"serialized key must be a str, got {type(s).__name__}")
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as exc:
        raise KeyFormatError(f"serialized key is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise KeyFormatError(f"serialized key is not a {kind!r} object")
    if obj.get("v") != FORMAT_VERSION:
        raise KeyFormatError(f"unsupported key format version {obj.get('v')!r}")
    out: dict[str, int] = {}
    for name in fields:
        val = obj.get(name)
        if not isinstance(val, str) or not val.isdigit():
            raise KeyFormatError(f"key field {name!r} must be a decimal string")
        out[name] = int(val)
    return out


def _validate_modulus(n: int, insecure_test_key: bool) -> None:
    _check_key_bits(n.bit_length(), insecure_test_key)
    if n % 2 == 0 or gmpy2.is_square(n) or gmpy2.is_prime(n):
        raise KeyFormatError("modulus n is not a product of two distinct odd primes")


def public_key_from_str(s: str, *, insecure_test_key: bool = False) -> PaillierPublicKey:
    """Parse ``public_key_to_str`` output; refuse keys < 2048 bits unless told otherwise."""
    fields = _load_key_json(s, _PUB_KIND, ("n",))
    _validate_modulus(fields["n"], insecure_test_key)
    return PaillierPublicKey(fields["n"])


def private_key_from_str(s: str, *, insecure_test_key: bool = False) -> PaillierPrivateKey:
    """Parse ``private_key_to_str`` output and check that p * q = n with p, q prime."""
    f = _load_key_json(s, _PRIV_KIND, ("n", "p", "q"))
    n, p, q = f["n"], f["p"], f["q"]
    _validate_modulus(n, insecure_test_key)
    if p * q != n or p == q or not (gmpy2.is_prime(p) and gmpy2.is_prime(q)):
        raise KeyFormatError("private key is inconsistent: p, q must be distinct primes, p*q = n")
    return PaillierPrivateKey(PaillierPublicKey(n), p, q)


# --------------------------------------------------------------------- obfuscators


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _powmod_fixed(bases: Sequence[Any], exp: Any, mod: Any, workers: int | None) -> list[Any]:
    """``[b**exp % mod for b in bases]`` with gmpy2, split across threads (GIL released)."""
    workers = _default_workers() if workers is None else workers
    if workers <= 1 or len(bases) < PARALLEL_THRESHOLD:
        return list(gmpy2.powmod_base_list(list(bases), exp, mod))
    k = min(workers, len(bases))
    size = -(-len(bases) // k)
    chunks = [list(bases[i : i + size]) for i in range(0, len(bases), size)]
    with ThreadPoolExecutor(max_workers=len(chunks)) as ex:
        parts = list(ex.map(lambda ch: gmpy2.powmod_base_list(ch, exp, mod), chunks))
    return [x for part in parts for x in part]


def _random_units(n: Any, count: int) -> list[Any]:
    """``count`` uniform random elements of Z_n^* from the OS CSPRNG."""
    out = []
    n_int = int(n)
    while len(out) < count:
        r = gmpy2.mpz(secrets.randbelow(n_int - 1) + 1)
        if gmpy2.gcd(r, n) == 1:  # fails with probability ~2/sqrt(n); would reveal a factor
            out.append(r)
    return out


def compute_obfuscators(
    public_key: PaillierPublicKey, count: int, *, workers: int | None = None
) -> list[Any]:
    """Fresh obfuscators r^n mod n^2 (gmpy2 mpz), computed on ``workers`` threads."""
    n = gmpy2.mpz(public_key.n)
    return _powmod_fixed(_random_units(n, count), n, n * n, workers)


class ObfuscatorPool:
    """Precomputed obfuscators, each handed out at most once.

    Reusing an obfuscator for two plaintexts reveals their difference, so ``take`` pops, the
    pool refuses to be pickled, and it refuses to serve in a forked child (whose copy of the
    pool would duplicate the parent's). When the pool runs short, ``take`` computes the rest
    on the spot, so encryption never blocks on, or fails because of, an empty pool.
    """

    def __init__(self, public_key: PaillierPublicKey, *, workers: int | None = None) -> None:
        self.public_key = public_key
        self.key_fingerprint = fingerprint(public_key)
        self.workers = workers
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._bg: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self) -> None:
        raise TypeError("ObfuscatorPool must not be pickled: a copy would reuse obfuscators")

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise PaillierError(
                f"ObfuscatorPool created in process {self._pid} used in process {os.getpid()}: "
                "a forked copy would reuse the parent's obfuscators; create a new pool"
            )

    def fill(self, count: int) -> int:
        """Compute ``count`` more obfuscators now; return the new pool size."""
        self._check_process()
        new = compute_obfuscators(self.public_key, count, workers=self.workers)
        with self._lock:
            self._items.extend(new)
            return len(self._items)

    def refill_async(self, target: int) -> Future[int]:
        """Top the pool up to ``target`` items in a background thread (e.g. between rounds)."""
        self._check_process()
        if self._bg is None:
            self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="obfuscator-pool")
        return self._bg.submit(lambda: self.fill(max(0, target - len(self))))

    def take(self, count: int) -> list[Any]:
        """Remove and return ``count`` obfuscators, computing any shortfall synchronously."""
        self._check_process()
        with self._lock:
            got = [self._items.popleft() for _ in range(min(count, len(self._items)))]
        if len(got) < count:
            got.extend(compute_obfuscators(self.public_key, count - len(got), workers=self.workers))
        return got

    def close(self) -> None:
        """Stop the background refill thread (waits for a running refill)."""
        if self._bg is not None:
            self._bg.shutdown(wait=True)
            self._bg = None


# ---------------------------------------------------------------------- decryption


@runtime_checkable
class Decryptor(Protocol):
    """Turns Paillier ciphertext ints into plaintext ints under ``public_key``.

    A threshold decryptor (partial decryptions combined from several key holders) only has to
    implement this to plug into ``decrypt_vector`` / ``KeyAuthority``.
    """

    @property
    def public_key(self) -> PaillierPublicKey: ...

    def decrypt_raw(self, ciphertexts: Sequence[int]) -> list[int]: ...


class CrtDecryptor:
    """phe's CRT decryption (exponentiations mod p^2 and q^2), batched on threads."""

    def __init__(self, private_key: PaillierPrivateKey, *, workers: int | None = None) -> None:
        self._sk = private_key
        self._p, self._q = gmpy2.mpz(private_key.p), gmpy2.mpz(private_key.q)
        self._p2, self._q2 = self._p * self._p, self._q * self._q
        self._hp, self._hq = gmpy2.mpz(private_key.hp), gmpy2.mpz(private_key.hq)
        self._p_inv = gmpy2.mpz(private_key.p_inverse)
        self.workers = workers

    @property
    def public_key(self) -> PaillierPublicKey:
        return self._sk.public_key

    def decrypt_raw(self, ciphertexts: Sequence[int]) -> list[int]:
        p, q, p2, q2 = self._p, self._q, self._p2, self._q2
        xp = _powmod_fixed([gmpy2.mpz(c) % p2 for c in ciphertexts], p - 1, p2, self.workers)
        xq = _powmod_fixed([gmpy2.mpz(c) % q2 for c in ciphertexts], q - 1, q2, self.workers)
        out = []
        for a, b in zip(xp, xq, strict=True):
            mp = ((a - 1) // p) * self._hp % p
            mq = ((b - 1) // q) * self._hq % q
            out.append(int(mp + ((mq - mp) * self._p_inv % q) * p))
        return out


def as_decryptor(key: PaillierPrivateKey | Decryptor) -> Decryptor:
    """Accept either a phe private key or anything implementing ``Decryptor``."""
    if isinstance(key, PaillierPrivateKey):
        return CrtDecryptor(key)
    if isinstance(key, Decryptor):
        return key
    raise TypeError(f"expected a PaillierPrivateKey or a Decryptor, got {type(key).__name__}")


# -------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackingLayout:
    """Everything, besides the key, needed to interpret a packed ciphertext."""

    frac_bits: int
    bound: float
    max_summands: int
    headroom_bits: int = 2

    def __post_init__(self) -> None:
        for name in ("frac_bits", "max_summands", "headroom_bits"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise PaillierError(f"layout {name} must be an int, got {val!r}")
        if self.max_summands < 1:
            raise PaillierError(f"max_summands must be >= 1, got {self.max_summands}")
        if not 0 <= self.headroom_bits <= 64:
            raise PaillierError(f"headroom_bits must be in [0, 64], got {self.headroom_bits}")
        object.__setattr__(self, "bound", float(self.bound))
        _ = self.codec  # validates frac_bits and bound

    @property
    def codec(self) -> FixedPointCodec:
        return FixedPointCodec(frac_bits=self.frac_bits, bound=self.bound)

    @property
    def slot_bits(self) -> int:
        """Bits per slot: room for the sum of max_summands encodings, plus headroom."""
        return self.codec.bits_per_value(self.max_summands) + self.headroom_bits

    def slots_per_ciphertext(self, n: int) -> int:
        """Slots per plaintext; the packed value stays below 2^(bits(n)-2) < n."""
        return (n.bit_length() - 2) // self.slot_bits

    def to_dict(self) -> dict[str, Any]:
        return {
            "frac_bits": self.frac_bits,
            "bound": self.bound,
            "max_summands": self.max_summands,
            "headroom_bits": self.headroom_bits,
        }

    @classmethod
    def from_dict(cls, d: Any) -> PackingLayout:
        keys = {"frac_bits", "bound", "max_summands", "headroom_bits"}
        if not isinstance(d, dict) or set(d) != keys:
            raise CiphertextFormatError(
                f"packing layout must have exactly the fields {sorted(keys)}"
            )
        if not isinstance(d["bound"], (int, float)) or isinstance(d["bound"], bool):
            raise CiphertextFormatError("packing layout bound must be a number")
        try:
            return cls(**d)
        except ValueError as exc:
            raise CiphertextFormatError(f"invalid packing layout: {exc}") from None


@dataclass(frozen=True, eq=False)
class EncryptedVector:
    """Packed ciphertexts of a float vector (or of the sum of ``n_summands`` vectors)."""

    ciphertexts: tuple[Any, ...]
    length: int
    n_summands: int
    key_fingerprint: str
    layout: PackingLayout
    public_key: PaillierPublicKey = field(repr=False)

    def __post_init__(self) -> None:
        if self.n_summands > self.layout.max_summands:
            raise SummandOverflowError(
                f"{self.n_summands} summands exceed max_summands={self.layout.max_summands} "
                "of the packing layout: slots could overflow"
            )

    def _check_compatible(self, other: EncryptedVector) -> None:
        if not isinstance(other, EncryptedVector):
            raise TypeError(f"cannot add EncryptedVector and {type(other).__name__}")
        if other.key_fingerprint != self.key_fingerprint:
            raise KeyMismatchError(
                f"cannot add ciphertexts under keys {self.key_fingerprint} and "
                f"{other.key_fingerprint}"
            )
        if other.layout != self.layout:
            raise LayoutMismatchError(
                f"cannot add vectors with layouts {self.layout} and {other.layout}"
            )
        if other.length != self.length:
            raise LayoutMismatchError(
                f"cannot add vectors of lengths {self.length} and {other.length}"
            )

    def add(self, other: EncryptedVector) -> EncryptedVector:
        """Homomorphic sum: multiply ciphertexts mod n^2, add summand counts."""
        self._check_compatible(other)
        n2 = self._n2()
        return self._derived(
            (a * b % n2 for a, b in zip(self.ciphertexts, other.ciphertexts, strict=True)),
            self.n_summands + other.n_summands, "sum would have")

    def _n2(self) -> Any:
        n = gmpy2.mpz(self.public_key.n)
        return n * n

    def _derived(self, cts: Iterable[Any], total: int, what: str) -> EncryptedVector:
        """A vector computed from this one, holding ``total`` summands (refused beyond
        the layout's headroom: the packed slots could overflow)."""
        if total > self.layout.max_summands:
            raise SummandOverflowError(
                f"{what} {total} summands, more than max_summands="
                f"{self.layout.max_summands}: slots could overflow"
            )
        return EncryptedVector(
            tuple(cts), self.length, total, self.key_fingerprint, self.layout, self.public_key
        )

    def scaled(self, weight: int) -> EncryptedVector:
        """Homomorphic multiplication by a whole number ``weight`` ≥ 1 (``c^w mod n²``):
        every packed slot times ``weight``, counted as ``weight`` summands, so the layout's
        headroom check still guards the slots (a weighted sum of site updates)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise PaillierError(f"a ciphertext weight must be a whole number >= 1, got "
                                f"{weight!r}")
        n2 = self._n2()
        return self._derived((gmpy2.powmod(gmpy2.mpz(c), weight, n2) for c in self.ciphertexts),
                             self.n_summands * weight, f"weight {weight} makes")

    def __add__(self, other: EncryptedVector) -> EncryptedVector:
        return self.add(other)

    def __radd__(self, other: Any) -> EncryptedVector:
        if isinstance(other, int) and other == 0:  # lets builtin sum() start from 0
            return self
        return self.add(other)

    @staticmethod
    def sum(vectors: Iterable[EncryptedVector]) -> EncryptedVector:
        """Homomorphic sum of one or more encrypted vectors."""
        vs = list(vectors)
        if not vs:
            raise PaillierError("cannot sum an empty list of encrypted vectors")
        for v in vs[1:]:
            vs[0]._check_compatible(v)
        total = sum(v.n_summands for v in vs)
        first = vs[0]
        if total > first.layout.max_summands:
            raise SummandOverflowError(
                f"sum would have {total} summands, more than max_summands="
                f"{first.layout.max_summands}: slots could overflow"
            )
        n = gmpy2.mpz(first.public_key.n)
        n2 = n * n
        cts = list(first.ciphertexts)
        for v in vs[1:]:
            cts = [a * b % n2 for a, b in zip(cts, v.ciphertexts, strict=True)]
        return EncryptedVector(
            tuple(cts), first.length, total, first.key_fingerprint, first.layout, first.public_key
        )

    def to_str(self) -> str:
        """One compact string: JSON header with base64 of fixed-width big-endian ciphertexts."""
        width = _ct_width(self.public_key)
        body = b"".join(int(c).to_bytes(width, "big") for c in self.ciphertexts)
        return json.dumps(
            {
                "scheme": SCHEME,
                "v": FORMAT_VERSION,
                "fp": self.key_fingerprint,
                "len": self.length,
                "k": self.n_summands,
                "layout": self.layout.to_dict(),
                "ct": base64.b64encode(body).decode("ascii"),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_str(
        cls,
        s: str,
        public_key: PaillierPublicKey,
        *,
        layout: PackingLayout | None = None,
        expected_length: int | None = None,
    ) -> EncryptedVector:
        """Parse and validate ``to_str`` output under ``public_key``.

        Checks the key fingerprint, the layout (if given), the length (if given), the body
        size, and that each ciphertext is a unit below n^2.
        """
        if not isinstance(s, str):
            raise CiphertextFormatError(f"encrypted vector must be a str, got {type(s).__name__}")
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            raise CiphertextFormatError(f"encrypted vector is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("scheme") != SCHEME:
            raise CiphertextFormatError(f"not a {SCHEME!r} encrypted vector")
        if obj.get("v") != FORMAT_VERSION:
            raise CiphertextFormatError(f"unsupported encrypted vector version {obj.get('v')!r}")
        fp = fingerprint(public_key)
        if obj.get("fp") != fp:
            raise KeyMismatchError(f"encrypted under key {obj.get('fp')!r}, but this key is {fp!r}")
        got_layout = PackingLayout.from_dict(obj.get("layout"))
        if layout is not None and got_layout != layout:
            raise LayoutMismatchError(f"packing layout {got_layout} differs from expected {layout}")
        length, k = obj.get("len"), obj.get("k")
        if not _is_pos_int(length):
            raise CiphertextFormatError(f"vector length must be a positive int, got {length!r}")
        if expected_length is not None and length != expected_length:
            raise LayoutMismatchError(f"vector length is {length}, expected {expected_length}")
        if not _is_pos_int(k):
            raise CiphertextFormatError(f"summand count must be a positive int, got {k!r}")
        if k > got_layout.max_summands:
            raise SummandOverflowError(
                f"summand count {k} exceeds max_summands={got_layout.max_summands}"
            )
        slots = got_layout.slots_per_ciphertext(public_key.n)
        if slots < 1:
            raise CiphertextFormatError(
                f"layout needs {got_layout.slot_bits}-bit slots; the key has no room for one"
            )
        n_ct = -(-length // slots)
        width = _ct_width(public_key)
        body_b64 = obj.get("ct")
        if not isinstance(body_b64, str):
            raise CiphertextFormatError("ciphertext body 'ct' must be a base64 str")
        expected_b64 = 4 * -(-(n_ct * width) // 3)
        if len(body_b64) != expected_b64:
            raise CiphertextFormatError(
                f"ciphertext body has {len(body_b64)} base64 chars, expected {expected_b64} "
                f"({n_ct} ciphertexts of {width} bytes for length {length}): truncated or padded"
            )
        try:
            body = base64.b64decode(body_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CiphertextFormatError(f"ciphertext body is corrupted base64: {exc}") from None
        if len(body) != n_ct * width:
            raise CiphertextFormatError(
                f"ciphertext body has {len(body)} bytes, expected {n_ct * width}"
            )
        n = gmpy2.mpz(public_key.n)
        n2 = n * n
        cts = []
        for i in range(n_ct):
            c = gmpy2.mpz(int.from_bytes(body[i * width : (i + 1) * width], "big"))
            if not 0 < c < n2:
                raise CiphertextFormatError(f"ciphertext {i} is not in (0, n^2)")
            if gmpy2.gcd(c, n) != 1:
                raise CiphertextFormatError(f"ciphertext {i} is not coprime to n")
            cts.append(c)
        return cls(tuple(cts), length, k, fp, got_layout, public_key)


def _ct_width(public_key: PaillierPublicKey) -> int:
    return (public_key.nsquare.bit_length() + 7) // 8


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def decrypt_vector(key: PaillierPrivateKey | Decryptor, enc: EncryptedVector) -> np.ndarray:
    """Decrypt, unpack and decode ``enc`` using its own layout; checks the key binding."""
    dec = as_decryptor(key)
    fp = fingerprint(dec.public_key)
    if enc.key_fingerprint != fp:
        raise KeyMismatchError(
            f"vector was encrypted under key {enc.key_fingerprint}, decryptor holds key {fp}"
        )
    layout = enc.layout
    sb = layout.slot_bits
    slots = layout.slots_per_ciphertext(dec.public_key.n)
    mask = (1 << sb) - 1
    plains = dec.decrypt_raw(enc.ciphertexts)
    q: list[int] = []
    for i, m in enumerate(plains):
        used = min(slots, enc.length - i * slots)
        if m >> (used * sb):
            raise PlaintextOverflowError(
                f"plaintext {i} has bits set above its {used} packed slots: the ciphertext is "
                "corrupted or a contribution was out of range"
            )
        q.extend((m >> (j * sb)) & mask for j in range(used))
    try:
        return layout.codec.decode_sum(q, enc.n_summands)
    except DecodingRangeError as exc:
        raise PlaintextOverflowError(f"decrypted sum is out of range: {exc}") from None


class PackedPaillier:
    """Encrypt float vectors packed many values per Paillier ciphertext."""

    def __init__(
        self,
        public_key: PaillierPublicKey,
        codec: FixedPointCodec,
        max_summands: int,
        *,
        headroom_bits: int = 2,
        workers: int | None = None,
        pool: ObfuscatorPool | None = None,
    ) -> None:
        self.public_key = public_key
        self.codec = codec
        self.layout = PackingLayout(codec.frac_bits, codec.bound, max_summands, headroom_bits)
        self.key_fingerprint = fingerprint(public_key)
        self.slot_bits = self.layout.slot_bits
        self.slots_per_ciphertext = self.layout.slots_per_ciphertext(public_key.n)
        if self.slots_per_ciphertext < 1:
            raise PaillierError(
                f"{self.slot_bits}-bit slots do not fit a {public_key.n.bit_length()}-bit key; "
                "lower bound, frac_bits or max_summands"
            )
        if pool is not None and pool.key_fingerprint != self.key_fingerprint:
            raise KeyMismatchError("obfuscator pool was built for a different public key")
        self.workers = workers
        self.pool = pool

    @classmethod
    def from_layout(
        cls, public_key: PaillierPublicKey, layout: PackingLayout, **kwargs: Any
    ) -> PackedPaillier:
        codec = FixedPointCodec(frac_bits=layout.frac_bits, bound=layout.bound)
        return cls(
            public_key, codec, layout.max_summands, headroom_bits=layout.headroom_bits, **kwargs
        )

    @property
    def max_summands(self) -> int:
        return self.layout.max_summands

    def n_ciphertexts(self, length: int) -> int:
        return -(-length // self.slots_per_ciphertext)

    def encrypt(self, vec: np.ndarray | Sequence[float]) -> EncryptedVector:
        """Encode, pack and encrypt a 1-D float vector with values in [-bound, bound]."""
        q = self.codec.encode(vec)
        if not q:
            raise PaillierError("cannot encrypt an empty vector")
        slots, sb = self.slots_per_ciphertext, self.slot_bits
        n_ct = self.n_ciphertexts(len(q))
        if self.pool is not None:
            obf = self.pool.take(n_ct)
        else:
            obf = compute_obfuscators(self.public_key, n_ct, workers=self.workers)
        n = gmpy2.mpz(self.public_key.n)
        n2 = n * n
        cts = []
        for i in range(n_ct):
            m = 0
            for v in reversed(q[i * slots : (i + 1) * slots]):  # slot 0 in the low bits
                m = (m << sb) | v
            cts.append((1 + m * n) * obf[i] % n2)  # (n+1)^m = 1 + m*n mod n^2
        return EncryptedVector(
            tuple(cts), len(q), 1, self.key_fingerprint, self.layout, self.public_key
        )

    def add(self, a: EncryptedVector, b: EncryptedVector) -> EncryptedVector:
        return a.add(b)

    def sum(self, vectors: Iterable[EncryptedVector]) -> EncryptedVector:
        return EncryptedVector.sum(vectors)

    def decrypt(self, key: PaillierPrivateKey | Decryptor, enc: EncryptedVector) -> np.ndarray:
        """Decrypt and decode; the result is the sum of ``enc.n_summands`` vectors."""
        if enc.layout != self.layout:
            raise LayoutMismatchError(f"vector layout {enc.layout} differs from {self.layout}")
        return decrypt_vector(key, enc)

    def from_str(self, s: str, *, expected_length: int | None = None) -> EncryptedVector:
        """Parse a vector serialized by ``EncryptedVector.to_str`` for this key and layout."""
        return EncryptedVector.from_str(
            s, self.public_key, layout=self.layout, expected_length=expected_length
        )
