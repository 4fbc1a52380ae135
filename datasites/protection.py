"""How a site protects the vector it contributes, per the job's aggregation mode.

``plain`` sends it in clear; ``paillier`` encrypts it (packed, fixed point) under the key
authority's public key — taken from the site's own federation config, never from the data
scientist, who could otherwise substitute a key of their own — and signs the ciphertext with
the site's Ed25519 key so the authority can tell sites apart.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from datasites.federation_config import SiteKeys, read_config
from fed_tasks.encoding import codec_for, round_id, secagg_plan, session_round
from fed_tasks.site_step import plain_reply
from fed_tasks.spec import JobSpec
from privacy.paillier import ObfuscatorPool, PackedPaillier, fingerprint
from privacy.secagg_session import SecAggSessionClient, SessionKeyDirectory
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


def protect(keys: SiteKeys | None, spec: JobSpec, action: str, result: dict[str, Any],
            directory: Path | None = None) -> dict[str, Any]:
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
    if spec.aggregation == "secagg" and directory is not None:
        client = _load_client(directory, spec)
        q = np.zeros(client.vector_length, dtype=np.uint64)
        encoded = codec_for(spec, action).encode(vector)
        q[:len(encoded)] = np.asarray(encoded, dtype=np.uint64)
        masked = client.masked_input(session_round(action, result.get("round", 0)), q)
        _save_client(directory, spec, client)
        return {**result, "masked": masked.to_str()}
    raise PermissionError(f"aggregation {spec.aggregation!r} is not available at this site")


# ---- secure sum: the site's side of the session (state kept in the site directory) --------
SECAGG_CONTROL = ("secagg_advertise", "secagg_share", "secagg_unmask")


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


def secagg_control(directory: Path, site: str, spec: JobSpec, action: str,
                   message: dict[str, Any]) -> dict[str, Any]:
    """Key setup and unmasking calls of the secure sum.

    The session's parameters (threshold, modulus, members) come from the site's own
    federation config, so the orchestrator cannot lower the threshold or add members.
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
                                     rounds=plan["rounds"])
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
    else:
        out = {"shares": client.unmask(int(message["round"]), str(message["request"]),
                                       str(message["inbox"])).to_str()}
    _save_client(directory, spec, client)
    return out
