"""How a site protects the vector it contributes, per the job's aggregation mode.

``plain`` sends it in clear; ``paillier`` encrypts it (packed, fixed point) under the key
authority's public key — taken from the site's own federation config, never from the data
scientist, who could otherwise substitute a key of their own — and signs the ciphertext with
the site's Ed25519 key so the authority can tell sites apart.
"""

from __future__ import annotations

import threading
from typing import Any

from datasites.federation_config import SiteKeys
from fed_tasks.encoding import codec_for, round_id
from fed_tasks.site_step import plain_reply
from fed_tasks.spec import JobSpec
from privacy.paillier import ObfuscatorPool, PackedPaillier, fingerprint
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


def protect(keys: SiteKeys | None, spec: JobSpec, action: str, result: dict[str, Any]
            ) -> dict[str, Any]:
    """Replace ``result["vector"]`` by what may leave the site in ``spec.aggregation`` mode."""
    if "vector" not in result or spec.aggregation == "plain":
        return plain_reply(result)
    if keys is None:
        raise PermissionError(f"site has no federation keys for {spec.aggregation} aggregation")
    vector = result.pop("vector")
    if spec.aggregation == "paillier":
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
