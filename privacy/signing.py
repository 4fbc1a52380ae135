"""Ed25519 signatures binding a site's encrypted contribution to a job and a round.

Paillier ciphertexts are malleable and anyone holding the public key can make one, so the key
authority only accepts contributions signed by a known site. The signature covers site_id,
job_id, round and sha256(payload), so a contribution cannot be replayed into another job or
round, or re-attributed to another site.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

__all__ = [
    "ContributionFormatError",
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "SignatureError",
    "SignedAggregate",
    "SignedContribution",
    "generate_signing_key",
    "private_key_from_str",
    "private_key_to_str",
    "public_key_from_str",
    "public_key_to_str",
    "sign",
    "verify",
]

_DOMAIN = "fedsyft/signed-contribution/v1"


class SignatureError(ValueError):
    """A signature, or the key meant to check it, is missing, malformed or does not verify."""


class ContributionFormatError(ValueError):
    """A serialized ``SignedContribution`` is malformed."""


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (one per site)."""
    return Ed25519PrivateKey.generate()


def private_key_to_str(private_key: Ed25519PrivateKey) -> str:
    """Raw 32-byte seed, base64. Treat the result as a secret."""
    raw = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode("ascii")


def private_key_from_str(s: str) -> Ed25519PrivateKey:
    """Inverse of ``private_key_to_str``."""
    return Ed25519PrivateKey.from_private_bytes(_b64_32(s, "private key"))


def public_key_to_str(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Raw 32-byte public key, base64 (a private key is reduced to its public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


def public_key_from_str(s: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(_b64_32(s, "public key"))
    except SignatureError:
        raise
    except ValueError as exc:
        raise SignatureError(f"Ed25519 public key is invalid: {exc}") from None


def _b64_32(s: str, what: str) -> bytes:
    if not isinstance(s, str):
        raise SignatureError(f"Ed25519 {what} must be a base64 str, got {type(s).__name__}")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"Ed25519 {what} is not valid base64") from None
    if len(raw) != 32:
        raise SignatureError(f"Ed25519 {what} must be 32 bytes, got {len(raw)}")
    return raw


def sign(private_key: Ed25519PrivateKey, message: bytes) -> str:
    """Sign ``message``; returns the 64-byte signature in base64."""
    return base64.b64encode(private_key.sign(message)).decode("ascii")


def verify(public_key: str | Ed25519PublicKey, message: bytes, signature: str) -> None:
    """Return if ``signature`` is valid for ``message``; raise ``SignatureError`` otherwise."""
    pub = public_key_from_str(public_key) if isinstance(public_key, str) else public_key
    if not isinstance(signature, str) or not signature:
        raise SignatureError("signature is missing")
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not valid base64") from None
    if len(sig) != 64:
        raise SignatureError(f"signature must be 64 bytes, got {len(sig)}")
    try:
        pub.verify(sig, message)
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None


@dataclass(frozen=True)
class SignedContribution:
    """A site's payload (e.g. ``EncryptedVector.to_str()``) signed for one job and round."""

    site_id: str
    job_id: str
    round: int
    payload: str
    signature: str = ""
    #: digest of the model the contribution was computed from (see fed_tasks.site_state):
    #: every party summing contributions checks that they all share it
    model: str = ""

    def __post_init__(self) -> None:
        for name in ("site_id", "job_id", "payload"):
            val = getattr(self, name)
            if not isinstance(val, str) or not val:
                raise ContributionFormatError(f"{name} must be a non-empty str, got {val!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ContributionFormatError(f"round must be a non-negative int, got {self.round!r}")
        if not isinstance(self.signature, str):
            raise ContributionFormatError("signature must be a str")
        if not isinstance(self.model, str):
            raise ContributionFormatError("model must be a str")

    def canonical_bytes(self) -> bytes:
        """Unambiguous bytes covered by the signature (domain-separated, sorted-key JSON)."""
        return json.dumps(
            {
                "domain": _DOMAIN,
                "site_id": self.site_id,
                "job_id": self.job_id,
                "round": self.round,
                "payload_sha256": hashlib.sha256(self.payload.encode("utf-8")).hexdigest(),
                "model": self.model,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        ).encode("ascii")

    @classmethod
    def create(
        cls,
        private_key: Ed25519PrivateKey,
        site_id: str,
        job_id: str,
        round: int,
        payload: str,
        model: str = "",
    ) -> SignedContribution:
        """Build and sign a contribution in one step."""
        unsigned = cls(site_id, job_id, round, payload, model=model)
        return replace(unsigned, signature=sign(private_key, unsigned.canonical_bytes()))

    def verify(self, public_key: str | Ed25519PublicKey) -> None:
        """Raise ``SignatureError`` unless signed by ``public_key`` over these exact fields."""
        verify(public_key, self.canonical_bytes(), self.signature)

    def to_str(self) -> str:
        return json.dumps(
            {
                "site_id": self.site_id,
                "job_id": self.job_id,
                "round": self.round,
                "payload": self.payload,
                "signature": self.signature,
                "model": self.model,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_str(cls, s: str) -> SignedContribution:
        if not isinstance(s, str):
            raise ContributionFormatError(f"contribution must be a str, got {type(s).__name__}")
        try:
            obj: Any = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ContributionFormatError(f"contribution is not valid JSON: {exc}") from None
        keys = {"site_id", "job_id", "round", "payload", "signature", "model"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise ContributionFormatError(
                f"contribution must have exactly the fields {sorted(keys)}"
            )
        return cls(**obj)


_AGGREGATE_DOMAIN = "fedsyft/signed-aggregate/v1"


@dataclass(frozen=True)
class SignedAggregate:
    """The key authority's word on one decrypted sum: job, round, contributors, the model
    they all trained from, and the sum's sha256.

    Sites derive the next model from a sum only if the authority signed it, so neither the
    data scientist nor the orchestrator can hand a site a made-up "aggregate".
    """

    job_id: str
    round: int
    contributors: tuple[str, ...]
    model: str
    sum_sha256: str
    signature: str = ""
    #: a buffered sum: (site, slot, model) of every contribution, each site checks them
    parts: tuple[tuple[str, int, str], ...] = ()

    def canonical_bytes(self) -> bytes:
        body: dict[str, Any] = {"domain": _AGGREGATE_DOMAIN, "job_id": self.job_id,
                                "round": self.round, "contributors": sorted(self.contributors),
                                "model": self.model, "sum_sha256": self.sum_sha256}
        if self.parts:
            body["parts"] = [list(p) for p in self.parts]
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True
                          ).encode("ascii")

    @classmethod
    def create(cls, private_key: Ed25519PrivateKey, job_id: str, round: int,
               contributors: list[str], model: str, payload: str,
               parts: tuple[tuple[str, int, str], ...] = ()) -> SignedAggregate:
        unsigned = cls(job_id, round, tuple(sorted(contributors)), model,
                       hashlib.sha256(payload.encode("utf-8")).hexdigest(),
                       parts=tuple(sorted(tuple(p) for p in parts)))
        return replace(unsigned, signature=sign(private_key, unsigned.canonical_bytes()))

    def verify(self, public_key: str | Ed25519PublicKey, payload: str) -> None:
        """Raise ``SignatureError`` unless signed by ``public_key`` and about ``payload``."""
        verify(public_key, self.canonical_bytes(), self.signature)
        if hashlib.sha256(payload.encode("utf-8")).hexdigest() != self.sum_sha256:
            raise SignatureError("the signed aggregate is about another sum")

    def to_str(self) -> str:
        body: dict[str, Any] = {"job_id": self.job_id, "round": self.round,
                                "contributors": list(self.contributors), "model": self.model,
                                "sum_sha256": self.sum_sha256, "signature": self.signature}
        if self.parts:
            body["parts"] = [list(p) for p in self.parts]
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_str(cls, s: str) -> SignedAggregate:
        try:
            obj: Any = json.loads(s) if isinstance(s, str) else None
        except json.JSONDecodeError:
            obj = None
        keys = {"job_id", "round", "contributors", "model", "sum_sha256", "signature"}
        parts = obj.get("parts", []) if isinstance(obj, dict) else None
        if (not isinstance(obj, dict) or set(obj) - {"parts"} != keys
                or not isinstance(parts, list) or not all(
                    isinstance(p, list) and len(p) == 3 and isinstance(p[0], str)
                    and type(p[1]) is int and isinstance(p[2], str) for p in parts)
                or not isinstance(obj["contributors"], list)
                or not all(isinstance(c, str) for c in obj["contributors"])
                or isinstance(obj["round"], bool) or not isinstance(obj["round"], int)
                or not all(isinstance(obj[k], str)
                           for k in ("job_id", "model", "sum_sha256", "signature"))):
            raise ContributionFormatError(f"signed aggregate must be JSON with fields "
                                          f"{sorted(keys)}")
        return cls(obj["job_id"], obj["round"], tuple(obj["contributors"]), obj["model"],
                   obj["sum_sha256"], obj["signature"], tuple(tuple(p) for p in parts))
