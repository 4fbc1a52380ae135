"""Keys and the federation facts each site trusts, set up by the owners, not the scientist.

Every site holds an Ed25519 key to sign what it contributes, and a ``federation.json``
naming the key authority's Paillier public key and the member sites' signing keys. The key
authority holds the Paillier private key; it never leaves the authority's directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from datasites.runtime.site_files import write_private
from privacy import paillier, signing

CONFIG_FILE = "federation.json"
SIGNING_KEY_FILE = "contribution_key.pem"
PAILLIER_KEY_FILE = "paillier_private_key.json"


def _write_secret(path: Path, text: str) -> None:
    """Keys and the config are owner-only (0600) from creation, whatever the umask."""
    write_private(path, text)


def ensure_signing_key(directory: Path) -> str:
    """Create the site's contribution-signing key if needed; returns its public key."""
    path = Path(directory) / SIGNING_KEY_FILE
    if not path.exists():
        _write_secret(path, signing.private_key_to_str(signing.generate_signing_key()))
    return signing.public_key_to_str(signing.private_key_from_str(path.read_text()))


def store_paillier_key(directory: Path, private_key: Any) -> None:
    """Keep the authority's private key (0600) in its directory; it never leaves it."""
    _write_secret(Path(directory) / PAILLIER_KEY_FILE, paillier.private_key_to_str(private_key))


def write_config(directory: Path, config: dict[str, Any]) -> None:
    path = Path(directory) / CONFIG_FILE
    _write_secret(path, json.dumps(config, indent=1, sort_keys=True))
    load_site_keys.cache_clear()


def read_config(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


@dataclass(frozen=True)
class SiteKeys:
    """What a member site needs to contribute under secure aggregation."""

    site: str
    signing_key: Any
    paillier_public_key: Any
    max_sites: int


@lru_cache(maxsize=64)
def load_site_keys(directory: Path, site: str) -> SiteKeys | None:
    config = read_config(directory)
    if config is None:
        return None
    key = signing.private_key_from_str((Path(directory) / SIGNING_KEY_FILE).read_text())
    public = config.get("paillier_public_key")
    return SiteKeys(site, key, paillier.public_key_from_str(public) if public else None,
                    int(config["max_sites"]))


def load_authority_key(directory: Path) -> Any:
    return paillier.private_key_from_str((Path(directory) / PAILLIER_KEY_FILE).read_text())
