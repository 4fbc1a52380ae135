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

from datasites.federation_config import SiteKeys, read_config
from fed_tasks.codec import PayloadError
from fed_tasks.encoding import (
    codec_for,
    decode_session_sum,
    round_id,
    secagg_plan,
    session_round,
)
from fed_tasks.global_state import GlobalState
from fed_tasks.site_step import new_model, plain_reply
from fed_tasks.spec import JobSpec
from privacy.paillier import ObfuscatorPool, PackedPaillier, fingerprint
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


def protect(keys: SiteKeys | None, spec: JobSpec, action: str,
            result: dict[str, Any]) -> dict[str, Any]:
    """Replace ``result["vector"]`` by what may leave the site in ``spec.aggregation`` mode."""
    if "vector" not in result or spec.aggregation == "plain":
        return plain_reply(result)
    vector = result.pop("vector")
    if spec.aggregation == "paillier":
        if keys is None or keys.paillier_public_key is None:
            raise PermissionError("site has no key authority configured for paillier jobs")
        pool = _pool(keys)
        packer = PackedPaillier(keys.paillier_public_key, codec_for(spec, action),
                                max_summands=keys.max_sites, pool=pool)
        payload = packer.encrypt(vector).to_str()
        # precompute next round's obfuscators while the orchestrator aggregates
        pool.refill_async(packer.n_ciphertexts(len(vector)))
        contribution = SignedContribution.create(
            keys.signing_key, keys.site, spec.job_id,
            round_id(action, result.get("round", 0)), payload)
        return {**result, "contribution": contribution.to_str()}
    raise PermissionError(f"aggregation {spec.aggregation!r} is not available at this site")


# ---- secure sum: the site's side of the session (state kept in the site directory) --------
SECAGG_CONTROL = ("secagg_advertise", "secagg_share", "secagg_recover", "secagg_reveal")


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


class SecureSumCall:
    """One statistics or training call of a secure-sum job at this site.

    First it opens the previous aggregate the orchestrator relays (its self-masks come off
    only here) and advances the global model with it; the step then trains from that model,
    and its vector leaves masked. The session state is saved only if all of it succeeded.
    """

    def __init__(self, directory: Path, spec: JobSpec, action: str,
                 message: dict[str, Any]) -> None:
        self.directory, self.spec, self.action = directory, spec, action
        self.client = _load_client(directory, spec)
        secagg = message.get("secagg") or {}
        self.previous, self.inbox = secagg.get("previous"), secagg.get("inbox")
        self.message = {k: v for k, v in message.items() if k != "secagg"}
        self.opened: SessionOpenedSum | None = None

    def step_message(self) -> dict[str, Any]:
        """The step's input: the relayed model, advanced by the previous aggregate."""
        if self.action == "stats":
            if self.previous is not None:
                raise PermissionError("a statistics call opens no previous secure sum")
            return self.message
        if self.previous is None:
            raise PayloadError("a secure-sum training call must carry the previous aggregate's "
                               "masked sum (the site forms the model it trains from)")
        self.opened = self.client.open_sum(str(self.previous))
        state = GlobalState.from_message(self.message, new_model(self.spec).n_params)
        state.advance(*decode_session_sum(self.spec, self.opened.round,
                                          self.client.opened_values(self.opened),
                                          len(self.opened.survivors)))
        return {**self.message, **state.message(int(self.message["round"]))}

    def protect(self, result: dict[str, Any]) -> dict[str, Any]:
        """Mask the step's vector for this aggregate; save the session state."""
        vector = result.pop("vector")
        q = np.zeros(self.client.vector_length, dtype=np.uint64)
        encoded = codec_for(self.spec, self.action).encode(vector)
        q[:len(encoded)] = np.asarray(encoded, dtype=np.uint64)
        masked = self.client.masked_input(session_round(self.action, result.get("round", 0)), q,
                                          self.inbox)
        _save_client(self.directory, self.spec, self.client)
        return {**result, "masked": masked.to_str(),
                "opened": self.opened.to_str() if self.opened else None}


def secagg_control(directory: Path, site: str, spec: JobSpec, action: str,
                   message: dict[str, Any]) -> dict[str, Any]:
    """Key setup, dropout recovery and the final opening of the secure sum.

    The session's parameters (threshold, modulus, members) come from the site's own
    federation config, so the orchestrator cannot lower the threshold or add members; the
    smallest sum the site opens is the larger of the threshold and the job's ``min_sites``.
    """
    if spec.aggregation != "secagg":
        raise PermissionError(f"job {spec.job_id!r} does not use secure sum")
    config = read_config(directory)
    if config is None:
        raise PermissionError("site has no federation configuration for secure sum")
    if action == "secagg_advertise":
        plan = secagg_plan(spec, int(config["max_sites"]))
        client = SecAggSessionClient(site, job_id=spec.job_id, threshold=plan["threshold"],
                                     bits=plan["bits"], vector_length=plan["vector_length"],
                                     rounds=plan["rounds"], min_survivors=spec.min_sites)
        advert = client.advertise()
        _save_client(directory, spec, client)
        return {"advert": advert.to_str()}
    client = _load_client(directory, spec)
    if action == "secagg_share":
        directory_msg = SessionKeyDirectory.from_str(str(message["directory"]))
        strangers = sorted(set(directory_msg.keys) - set(config["sites"]))
        if strangers:
            raise PermissionError(f"key directory lists non-members {strangers}")
        out = {"shares": client.share(directory_msg).to_str()}
    elif action == "secagg_recover":
        out = {"recovery": client.recover(str(message["request"])).to_str()}
    else:  # secagg_reveal: the last aggregate (end of the job, or an early stop)
        out = {"opened": client.open_sum(str(message["previous"])).to_str()}
    _save_client(directory, spec, client)
    return out
