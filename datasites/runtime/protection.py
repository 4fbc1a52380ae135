"""How a site protects the vector it contributes, per the job's aggregation mode.

``plain`` sends it in clear; ``paillier`` encrypts it (packed, fixed point) under the key
authority's public key — taken from the site's own federation config, never from the data
scientist, who could otherwise substitute a key of their own — and signs the ciphertext with
the site's Ed25519 key so the authority can tell sites apart; ``secagg`` masks it for the
job's secure-sum session (:class:`SecureSumCall`), whose keys live in the site directory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature

from datasites.runtime.aggregate_check import (
    AggregateRefused,
    check_buffered,
    check_contributions,
)
from datasites.runtime.federation_config import SiteKeys, read_config
from fed_tasks.buffered import summands
from fed_tasks.compression import contribution_payload
from fed_tasks.encoding import (
    codec_for,
    decode_session_sum,
    secagg_plan,
    session_round,
)
from fed_tasks.messages import AggregateEvidence
from fed_tasks.schedule import slot_index
from fed_tasks.site_state import SiteModelState, aggregate_index
from fed_tasks.spec import JobSpec
from privacy import signing
from privacy.paillier import ObfuscatorPool, PackedPaillier, fingerprint
from privacy.secagg import SecAggError
from privacy.secagg_session import SecAggSessionClient, SessionKeyDirectory, SessionOpenedSum
from privacy.signing import SignedContribution

_POOLS: dict[tuple[str, str], ObfuscatorPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(keys: SiteKeys) -> ObfuscatorPool:
    """One obfuscator pool per site and key, refilled in the background between rounds
    (r^n mod n² is the cost of Paillier encryption; each value is used once)."""
    key = (keys.site, fingerprint(keys.paillier_public_key))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ObfuscatorPool(keys.paillier_public_key, workers=1)
        return _POOLS[key]


def clip_to_bound(spec: JobSpec, action: str, vector: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip to the encoding bound *at the site* and count it, instead of failing.

    An error raised only when a private value is large would answer a question about the
    private data for free; a clipped value and a count in the reply is the same fact,
    stated, counted and charged like any other call."""
    bound = codec_for(spec, action).bound
    clipped = np.clip(np.nan_to_num(vector, nan=0.0, posinf=bound, neginf=-bound), -bound, bound)
    return clipped, int(np.count_nonzero(clipped != vector))


def protect(keys: SiteKeys, spec: JobSpec, action: str, result: dict[str, Any],
            model: str) -> dict[str, Any]:
    """Replace ``result["vector"]`` by what may leave the site in ``spec.aggregation`` mode:
    a signed contribution bound to the job, the aggregate and the model it came from."""
    vector = np.asarray(result.pop("vector"), dtype=np.float64)
    payload = result.pop("payload", None)  # a compressed update, already encoded
    index = slot_index(spec, action, result.get("round", 0))
    if spec.aggregation == "plain":
        text = payload if payload is not None else contribution_payload(spec, action, vector)
        return {**result, "contribution": SignedContribution.create(
            keys.signing_key, keys.site, spec.job_id, index, text, model=model).to_str()}
    if spec.aggregation == "paillier":
        if keys.paillier_public_key is None:
            raise PermissionError("site has no key authority configured for paillier jobs")
        vector, clipped = clip_to_bound(spec, action, vector)
        pool = _pool(keys)
        packer = PackedPaillier(keys.paillier_public_key, codec_for(spec, action),
                                max_summands=summands(spec, action, keys.max_sites),
                                pool=pool)
        payload = packer.encrypt(vector).to_str()
        # precompute next round's obfuscators while the orchestrator aggregates
        pool.refill_async(packer.n_ciphertexts(len(vector)))
        contribution = SignedContribution.create(keys.signing_key, keys.site, spec.job_id,
                                                 index, payload, model=model)
        return {**result, "contribution": contribution.to_str(), "clipped": clipped}
    raise PermissionError(f"aggregation {spec.aggregation!r} is not available at this site")


# ---- secure sum: the site's side of the session (state kept in the site directory) --------
SECAGG_CONTROL = ("secagg_advertise", "secagg_share", "secagg_recover")


def _state_path(directory: Path, spec: JobSpec) -> Path:
    return Path(directory) / f"secagg_{spec.job_id}.state"


def _load_client(directory: Path, spec: JobSpec) -> SecAggSessionClient:
    path = _state_path(directory, spec)
    if not path.exists():
        raise PermissionError(f"job {spec.job_id!r} has no secure-sum keys at this site yet")
    return SecAggSessionClient.from_state(path.read_text())


def _save_client(directory: Path, spec: JobSpec, client: SecAggSessionClient) -> None:
    path = _state_path(directory, spec)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(client.export_state())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _open_evidence(client: SecAggSessionClient, keys: SiteKeys, config: dict[str, Any],
                   spec: JobSpec, evidence: AggregateEvidence, state: SiteModelState
                   ) -> tuple[SessionOpenedSum, np.ndarray]:
    """Check the survivors' signed masked inputs, form their sum and open it (this site's
    own computation: the orchestrator only relays). In a buffered training round an input
    may be a stale update masked again for this round: checked as in plain mode
    (:func:`~datasites.runtime.aggregate_check.check_buffered`), each member's slot then
    recorded in ``state.used``."""
    if evidence.kind != "secagg":
        raise AggregateRefused(f"a secure-sum job cannot use {evidence.kind!r} evidence")
    buffered = spec.async_k is not None and evidence.action == "fit"
    if buffered:
        signed = check_buffered(config, spec, evidence, keys.site, state)
    else:
        signed = check_contributions(config, spec, evidence, keys.site, state.digest)
    try:
        opened = client.open_round([c.payload for c in signed.values()], evidence.recovery)
    except SecAggError as exc:
        raise AggregateRefused(f"the secure sum does not open: {exc}") from None
    if sorted(opened.survivors) != sorted(signed):
        raise AggregateRefused("the opened sum's survivors differ from the signed inputs")
    index = aggregate_index(spec, evidence.action, evidence.round)
    if opened.round != index + 1:  # the inputs were masked for another aggregate
        raise AggregateRefused(f"the masked inputs are of session round {opened.round}, not "
                               f"of aggregate {index}'s")
    _, summed = decode_session_sum(spec, opened.round, client.opened_values(opened),
                                   len(opened.survivors))
    if buffered:
        state.used.update({name: c.round for name, c in signed.items()})
    return opened, summed


class SecureSumCall:
    """One statistics or training call of a secure-sum job at this site.

    The site first forms and opens the previous aggregate itself from the signed masked
    inputs the orchestrator relays (:func:`_open_evidence`), and advances its own model with
    it; the step then trains from that model, and its vector leaves masked and signed. The
    session state is saved only if all of it succeeded.
    """

    def __init__(self, directory: Path, keys: SiteKeys, spec: JobSpec) -> None:
        self.directory, self.keys, self.spec = directory, keys, spec
        self.client = _load_client(directory, spec)
        self.config = read_config(directory) or {}
        self.opened: SessionOpenedSum | None = None

    def save(self) -> None:
        """Keep the session state, e.g. right after opening a sum: once a site opened a
        round its survivors are final (it reveals no round key of it afterwards), also if
        the call stops before masking anything new."""
        _save_client(self.directory, self.spec, self.client)

    def open_previous(self, evidence: AggregateEvidence, state: SiteModelState) -> np.ndarray:
        self.opened, summed = _open_evidence(self.client, self.keys, self.config, self.spec,
                                             evidence, state)
        return summed

    def protect(self, action: str, result: dict[str, Any], inbox: str | None,
                model: str, roster: list[str] | None = None,
                computed_for: int | None = None) -> dict[str, Any]:
        """Mask the step's vector for this aggregate and sign it; save the session state.

        A buffered round masks over its ``roster``; a stale update masked again is signed
        with the slot it was ``computed_for`` (and ``model``, the one it started from)."""
        vector, clipped = clip_to_bound(self.spec, action, result.pop("vector"))
        q = np.zeros(self.client.vector_length, dtype=np.uint64)
        encoded = codec_for(self.spec, action).encode(vector)
        q[:len(encoded)] = np.asarray(encoded, dtype=np.uint64)
        r = session_round(self.spec, action, result.get("round", 0))
        masked = self.client.masked_input(r, q, inbox, roster)
        slot = (computed_for if computed_for is not None
                else slot_index(self.spec, action, result.get("round", 0)))
        signed = SignedContribution.create(self.keys.signing_key, self.keys.site, self.spec.job_id,
                                           slot, masked.to_str(), model=model)
        _save_client(self.directory, self.spec, self.client)
        return {**result, "masked": signed.to_str(), "clipped": clipped,
                "opened": self.opened.to_str() if self.opened else None}


def secagg_control(directory: Path, keys: SiteKeys, spec: JobSpec, action: str,
                   message: dict[str, Any]) -> dict[str, Any]:
    """Key setup and dropout recovery of the secure sum (the last opening is a model step:
    :class:`SecureSumCall`).

    The session's parameters (threshold, modulus, members) come from the site's own
    federation config, so the orchestrator cannot lower the threshold or add members; the
    smallest sum the site opens is the larger of the threshold and the job's ``min_sites``.
    Key adverts are signed with the site's key and checked against the members' keys, so
    the orchestrator cannot substitute keys of its own for another site's.
    """
    if spec.aggregation != "secagg":
        raise PermissionError(f"job {spec.job_id!r} does not use secure sum")
    config = read_config(directory)
    if config is None:
        raise PermissionError("site has no federation configuration for secure sum")
    if action == "secagg_advertise":
        plan = secagg_plan(spec, int(config["max_sites"]))
        client = SecAggSessionClient(keys.site, job_id=spec.job_id, threshold=plan["threshold"],
                                     bits=plan["bits"], vector_length=plan["vector_length"],
                                     rounds=plan["rounds"], min_survivors=spec.min_sites,
                                     round_bits=plan["round_bits"],
                                     buffered=spec.async_k is not None)
        advert = client.advertise(sign=lambda payload: keys.signing_key.sign(payload))
        _save_client(directory, spec, client)
        return {"advert": advert.to_str()}
    client = _load_client(directory, spec)
    if action == "secagg_share":
        directory_msg = SessionKeyDirectory.from_str(str(message["directory"]))
        members = config["sites"]
        strangers = sorted(set(directory_msg.keys) - set(members))
        if strangers:
            raise PermissionError(f"key directory lists non-members {strangers}")
        out = {"shares": client.share(directory_msg, verify=_member_verifier(members)).to_str()}
    elif action == "secagg_recover":
        out = {"recovery": client.recover(str(message["request"])).to_str()}
    else:
        raise PermissionError(f"unknown secure-sum action {action!r}")
    _save_client(directory, spec, client)
    return out


def _member_verifier(members: dict[str, str]):
    def verify(site: str, payload: bytes, signature: bytes) -> bool:
        key = members.get(site)
        if key is None:
            return False
        try:
            signing.public_key_from_str(key).verify(signature, payload)
        except (signing.SignatureError, InvalidSignature):
            return False
        return True

    return verify
