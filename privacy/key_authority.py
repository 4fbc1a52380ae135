"""Policy logic of the Paillier key authority: decrypt only honest aggregates, once.

The authority holds the Paillier private key. It never decrypts a ciphertext handed to it;
it receives the sites' signed contributions, checks them against its policy, forms the
homomorphic sum itself and returns only the decrypted sum. Policy:

- every contribution is signed (Ed25519) by a known site, for this job and this round;
- one contribution per site, each a single summand, same layout and length;
- at least ``min_sites`` distinct sites (``min_sites >= 2``, so no single vector is revealed);
- each (job_id, round) is decrypted at most once, so a coordinator cannot decrypt several
  subsets of the same round's contributions and difference them.

A (job_id, round) is marked spent *before* decrypting: a request that passes the checks but
fails to decrypt (out-of-range input) burns the round rather than allowing retries.

Limits: a malicious site that obtains another site's ciphertext can re-randomize it and
submit it as its own (the sum then over-weights the victim). Contributions must therefore
travel only to the authority; identical ciphertexts are refused as a cheap extra check.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from privacy import signing
from privacy.paillier import (
    Decryptor,
    EncryptedVector,
    PackingLayout,
    PaillierError,
    PaillierPrivateKey,
    as_decryptor,
    decrypt_vector,
    fingerprint,
    public_key_to_str,
)

__all__ = [
    "BadSignatureError",
    "CopiedContributionError",
    "DecryptionFailedError",
    "DuplicateSiteError",
    "InconsistentContributionsError",
    "KeyAuthority",
    "KeyAuthorityError",
    "MalformedContributionError",
    "PolicyConfigError",
    "ReplayError",
    "RequestMismatchError",
    "SpentStoreError",
    "TooFewSitesError",
    "UnknownSiteError",
]


class KeyAuthorityError(ValueError):
    """A decryption request was refused; the message names the reason."""


class PolicyConfigError(KeyAuthorityError):
    """The authority itself is misconfigured (e.g. min_sites < 2)."""


class SpentStoreError(KeyAuthorityError):
    """The persisted set of spent rounds is unreadable; refuse rather than forget it."""


class ReplayError(KeyAuthorityError):
    """This (job_id, round) was already decrypted."""


class MalformedContributionError(KeyAuthorityError):
    """A contribution or its encrypted payload cannot be parsed or validated."""


class UnknownSiteError(KeyAuthorityError):
    """A contribution claims a site the authority has no public key for."""


class BadSignatureError(KeyAuthorityError):
    """A contribution is unsigned or its signature does not verify."""


class RequestMismatchError(KeyAuthorityError):
    """A contribution was signed for another job or round than the one requested."""


class DuplicateSiteError(KeyAuthorityError):
    """Two contributions come from the same site."""


class CopiedContributionError(KeyAuthorityError):
    """Two sites submitted the very same ciphertexts."""


class TooFewSitesError(KeyAuthorityError):
    """Fewer distinct sites than the policy requires."""


class InconsistentContributionsError(KeyAuthorityError):
    """Contributions differ in layout or length, or claim more than one summand each."""


class DecryptionFailedError(KeyAuthorityError):
    """The sum passed every check but does not decode (an input was out of range)."""


class DecryptedSum(NamedTuple):
    """A decrypted sum with the facts the authority attests about it."""

    total: np.ndarray
    contributors: list[str]
    model: str
    # a buffered sum: (site, slot, model) of each contribution, sorted by site
    parts: tuple[tuple[str, int, str], ...] = ()


@dataclass(frozen=True)
class BufferRule:
    """How a buffered sum (FedBuff) may mix updates computed for earlier slots, derived by
    the caller from the approved job: ``accepts(slot)`` says whether an update computed for
    ``slot`` may join this sum (recent enough, of the same phase), ``weight(slot)`` is its
    whole-number weight (a fresh update's is the largest). Each site's contributions are
    decrypted at most once and in increasing slots, and at least ``min_sites`` of them must
    be of the sum's own slot."""

    accepts: Callable[[int], bool]
    weight: Callable[[int], int]


class KeyAuthority:
    """Checks signed contributions and returns only the decrypted sum of at least k sites."""

    def __init__(
        self,
        private_key: PaillierPrivateKey | Decryptor,
        site_public_keys: Mapping[str, str],
        min_sites: int,
        *,
        spent_path: str | os.PathLike[str] | None = None,
        layout: PackingLayout | None = None,
    ) -> None:
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 2:
            raise PolicyConfigError(
                f"min_sites must be an int >= 2, got {min_sites!r}: "
                "decrypting a single site's contribution would reveal it"
            )
        if min_sites > len(site_public_keys):
            raise PolicyConfigError(
                f"min_sites={min_sites} but only {len(site_public_keys)} site key(s) are known"
            )
        self._site_keys: dict[str, signing.Ed25519PublicKey] = {}
        for site, key_str in site_public_keys.items():
            try:
                self._site_keys[site] = signing.public_key_from_str(key_str)
            except signing.SignatureError as exc:
                raise PolicyConfigError(f"public key of site {site!r} is invalid: {exc}") from None
        self._decryptor = as_decryptor(private_key)
        self.public_key = self._decryptor.public_key
        self.key_fingerprint = fingerprint(self.public_key)
        self.min_sites = min_sites
        self.layout = layout
        self._spent_path = Path(spent_path) if spent_path is not None else None
        self._last: dict[tuple[str, str], int] = {}  # buffered: (job, site) -> last slot
        self._spent: set[tuple[str, int]] = self._load_spent()
        self._lock = threading.Lock()

    @property
    def public_key_str(self) -> str:
        """The Paillier public key the sites should encrypt under."""
        return public_key_to_str(self.public_key)

    @property
    def site_ids(self) -> frozenset[str]:
        return frozenset(self._site_keys)

    def is_spent(self, job_id: str, round: int) -> bool:
        return (job_id, round) in self._spent

    def decrypt_sum(
        self,
        job_id: str,
        round: int,
        contributions: Sequence[str],
        *,
        expected_length: int | None = None,
    ) -> np.ndarray:
        """Validate ``contributions`` (``SignedContribution.to_str()`` strings) and return
        the decrypted sum of their vectors. Raises a ``KeyAuthorityError`` subclass naming
        the first policy violation found."""
        if not isinstance(job_id, str) or not job_id:
            raise RequestMismatchError(f"job_id must be a non-empty str, got {job_id!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise RequestMismatchError(f"round must be a non-negative int, got {round!r}")
        return self.decrypt_checked(job_id, round, contributions,
                                    expected_length=expected_length).total

    def decrypt_checked(
        self,
        job_id: str,
        round: int,
        contributions: Sequence[str],
        *,
        expected_length: int | None = None,
        buffer: BufferRule | None = None,
    ) -> DecryptedSum:
        """As :meth:`decrypt_sum`, also returning who contributed and the model digest they
        all share (so the authority can attest the sum to the sites). With ``buffer``, a
        buffered sum: see :class:`BufferRule`."""
        if not isinstance(job_id, str) or not job_id:
            raise RequestMismatchError(f"job_id must be a non-empty str, got {job_id!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise RequestMismatchError(f"round must be a non-negative int, got {round!r}")
        if isinstance(contributions, str):
            raise MalformedContributionError("contributions must be a list of str, not one str")
        if buffer is not None:
            return self._decrypt_buffered(job_id, round, list(contributions), expected_length,
                                          buffer)
        with self._lock:
            self._check_not_spent(job_id, round)
            signed = self._verify_contributions(job_id, round, list(contributions))
            models = {c.model for c in signed}
            if len(models) != 1:
                raise InconsistentContributionsError(
                    f"round {round} of job {job_id!r}: the contributions were computed from "
                    f"{len(models)} different models (a site was sent another model)")
            vectors = self._parse_payloads(signed, expected_length)
            total = EncryptedVector.sum(vectors)
            self._mark_spent(job_id, round)
            plain = self._decrypt(job_id, round, total)
            return DecryptedSum(plain, sorted(c.site_id for c in signed), models.pop())

    def _decrypt(self, job_id: str, round: int, total: EncryptedVector) -> np.ndarray:
        """The spent round's sum in clear (a failure still spends it: no second try)."""
        try:
            return decrypt_vector(self._decryptor, total)
        except PaillierError as exc:
            raise DecryptionFailedError(
                f"round {round} of job {job_id!r} could not be decrypted ({exc}); "
                "the round is spent"
            ) from None

    def _decrypt_buffered(self, job_id: str, round: int, contributions: list[str],
                          expected_length: int | None, buffer: BufferRule) -> DecryptedSum:
        """A buffered sum: fresh updates (computed for ``round``, from one model) and stale
        ones the rule accepts, each weighted by ``buffer.weight`` homomorphically."""
        with self._lock:
            self._check_not_spent(job_id, round)
            signed = self._verify_contributions(
                job_id, round, contributions,
                slot_ok=lambda slot: slot == round or (slot < round and buffer.accepts(slot)))
            fresh = [c for c in signed if c.round == round]
            if len(fresh) < self.min_sites:
                raise TooFewSitesError(
                    f"only {len(fresh)} update(s) of round {round} in the buffer, policy "
                    f"requires at least {self.min_sites} (stale ones only add to them)")
            models = {c.model for c in fresh}
            if len(models) != 1:
                raise InconsistentContributionsError(
                    f"round {round} of job {job_id!r}: the fresh contributions were computed "
                    f"from {len(models)} different models (a site was sent another model)")
            for c in signed:
                last = self._last.get((job_id, c.site_id), -1)
                if c.round <= last:
                    raise ReplayError(
                        f"the update of site {c.site_id!r} for round {c.round} was already "
                        f"decrypted, or is older than one that was (round {last})")
            vectors = self._parse_payloads(signed, expected_length)
            total = EncryptedVector.sum(
                v.scaled(buffer.weight(c.round)) for c, v in zip(signed, vectors, strict=True))
            self._mark_spent(job_id, round, {c.site_id: c.round for c in signed})
            plain = self._decrypt(job_id, round, total)
            parts = tuple(sorted((c.site_id, c.round, c.model) for c in signed))
            return DecryptedSum(plain, sorted(c.site_id for c in signed), models.pop(), parts)

    # ------------------------------------------------------------------ checks

    def _check_not_spent(self, job_id: str, round: int) -> None:
        if (job_id, round) in self._spent:
            raise ReplayError(f"round {round} of job {job_id!r} was already decrypted")

    def _verify_contributions(
        self, job_id: str, round: int, contributions: list[str],
        slot_ok: Callable[[int], bool] | None = None,
    ) -> list[signing.SignedContribution]:
        if not contributions:
            raise TooFewSitesError(
                f"no contribution received, policy requires at least {self.min_sites} sites"
            )
        seen: set[str] = set()
        out = []
        for i, raw in enumerate(contributions):
            try:
                c = signing.SignedContribution.from_str(raw)
            except (signing.ContributionFormatError, TypeError) as exc:
                raise MalformedContributionError(f"contribution #{i} is malformed: {exc}") from None
            key = self._site_keys.get(c.site_id)
            if key is None:
                raise UnknownSiteError(f"contribution #{i} comes from unknown site {c.site_id!r}")
            try:
                c.verify(key)
            except signing.SignatureError as exc:
                raise BadSignatureError(
                    f"signature of site {c.site_id!r} does not verify ({exc})"
                ) from None
            if c.job_id != job_id or not (slot_ok(c.round) if slot_ok else c.round == round):
                raise RequestMismatchError(
                    f"contribution of site {c.site_id!r} is for job {c.job_id!r} round "
                    f"{c.round}, but the request is for job {job_id!r} round {round}"
                )
            if c.site_id in seen:
                raise DuplicateSiteError(f"duplicate contribution from site {c.site_id!r}")
            seen.add(c.site_id)
            out.append(c)
        if len(seen) < self.min_sites:
            raise TooFewSitesError(
                f"only {len(seen)} distinct site{'s' if len(seen) != 1 else ''} contributed, "
                f"policy requires at least {self.min_sites}"
            )
        return out

    def _parse_payloads(
        self, signed: list[signing.SignedContribution], expected_length: int | None
    ) -> list[EncryptedVector]:
        vectors: list[EncryptedVector] = []
        by_cts: dict[tuple[int, ...], str] = {}
        for c in signed:
            try:
                v = EncryptedVector.from_str(
                    c.payload, self.public_key, layout=self.layout, expected_length=expected_length
                )
            except PaillierError as exc:
                raise MalformedContributionError(
                    f"payload of site {c.site_id!r} is invalid: {exc}"
                ) from None
            if v.n_summands != 1:
                raise InconsistentContributionsError(
                    f"contribution of site {c.site_id!r} claims {v.n_summands} summands; "
                    "each site contributes exactly 1"
                )
            first = vectors[0] if vectors else None
            if first is not None and (v.layout != first.layout or v.length != first.length):
                raise InconsistentContributionsError(
                    f"contribution of site {c.site_id!r} (length {v.length}, {v.layout}) does "
                    f"not match that of site {signed[0].site_id!r} "
                    f"(length {first.length}, {first.layout})"
                )
            key = tuple(int(x) for x in v.ciphertexts)
            if key in by_cts:
                raise CopiedContributionError(
                    f"sites {by_cts[key]!r} and {c.site_id!r} submitted identical ciphertexts"
                )
            by_cts[key] = c.site_id
            vectors.append(v)
        max_k = vectors[0].layout.max_summands
        if len(vectors) > max_k:
            raise InconsistentContributionsError(
                f"{len(vectors)} contributions exceed the layout's max_summands={max_k}"
            )
        return vectors

    # -------------------------------------------------------------- spent store

    def _load_spent(self) -> set[tuple[str, int]]:
        path = self._spent_path
        if path is None or not path.exists():
            return set()
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            entries = obj["spent"]
            spent = {(str(job), int(rnd)) for job, rnd in entries}
            self._last = {(str(j), str(site)): int(slot) for j, site, slot in obj.get("last", [])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpentStoreError(
                f"spent-rounds file {str(path)!r} is unreadable ({exc}); refusing to start "
                "without it, since rounds could then be decrypted twice"
            ) from None
        return spent

    def _mark_spent(self, job_id: str, round: int, slots: Mapping[str, int] | None = None
                    ) -> None:
        """Record the round (and, for a buffered sum, each site's slot) before decrypting."""
        before = dict(self._last)
        self._spent.add((job_id, round))
        self._last.update({(job_id, site): slot for site, slot in (slots or {}).items()})
        if self._spent_path is None:
            return
        data = json.dumps({"version": 2, "spent": sorted([j, r] for j, r in self._spent),
                           "last": sorted([j, site, slot]
                                          for (j, site), slot in self._last.items())})
        path = self._spent_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: a crash leaves the old or the new file, never half
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            self._spent.discard((job_id, round))
            self._last = before
            raise
