"""A site answering through its real entry point without syft transport.

Used to measure what the site-side protocols cost apart from PySyft, and to test many-site
scenarios (dropouts) cheaply: the guard, the approval, the fed_tasks step and the protection
(masking, with state in the site directory) are the production code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from datasites.governance.guard import SiteGuard, register_guard, unregister_guard
from datasites.runtime.federation_config import (
    ensure_signing_key,
    read_config,
    store_paillier_key,
    write_config,
)
from datasites.runtime.site_entry import run_approved
from fed_tasks.codec import dumps, loads
from fed_tasks.interface import SiteRefusedError
from fed_tasks.schedule import total_slots
from fed_tasks.spec import JobSpec


def _result(name: str, envelope_text: str) -> dict[str, Any]:
    """An entry point's envelope as a connection returns it: the result, or the refusal."""
    envelope = loads(envelope_text)
    if envelope["status"] != "ok":
        raise SiteRefusedError(name, str(envelope.get("reason", envelope["status"])))
    return envelope["result"]


class DirectSite:
    """:class:`fed_tasks.interface.SiteConnection` calling ``run_approved`` in-process."""

    def __init__(self, name: str, directory: str | Path, spec: JobSpec, train: pd.DataFrame,
                 test: pd.DataFrame, approved_by: str = "owner@direct.site") -> None:
        self.name, self.spec, self.train, self.test = name, spec, train, test
        self.guard = SiteGuard(name, directory)
        self.guard.register_assets({"train": train, "test": test}, {})
        self.guard.record_approval(spec, "direct", approved_by)
        register_guard(self.guard)
        self.offline = False

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        if self.offline:
            raise ConnectionError(f"site {self.name!r} stopped answering")
        return _result(self.name, run_approved(
            site=self.name, job_id=self.spec.job_id, spec=self.spec.to_json(),
            train=self.train, test=self.test, action=action, payload=dumps(message)))

    def close(self) -> None:
        unregister_guard(self.guard)


def direct_federation(root: str | Path, spec: JobSpec,
                      frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> list[DirectSite]:
    """Sites with signing keys and a shared federation config (no key authority)."""
    sites = [DirectSite(name, Path(root) / name, spec, tr, te)
             for name, (tr, te) in frames.items()]
    config = {"sites": {s.name: ensure_signing_key(s.guard.directory) for s in sites},
              "audit_keys": {s.name: (s.guard.directory / "audit_key.pub").read_text()
                             for s in sites},
              "max_sites": len(sites), "min_sites": 2, "paillier_public_key": None,
              "key_authority": None}
    for s in sites:
        write_config(s.guard.directory, config)
    return sites


class DirectAuthority:
    """The key authority's real entry point (``run_key_authority``) without syft transport:
    its guard, approval, spent-round store and signed attestations are the production code."""

    def __init__(self, name: str, directory: Path, spec: JobSpec, private_key: Any,
                 public: Any) -> None:
        from datasites.runtime.key_authority_site import KEYRING
        from privacy.paillier import fingerprint

        self.name, self.spec = name, spec
        self.keyring = pd.DataFrame({"key_fingerprint": [fingerprint(public)]})
        self.guard = SiteGuard(name, directory)
        self.guard.register_assets({KEYRING: self.keyring}, {})
        self.guard.record_approval(spec, "direct", "owner@authority.site",
                                   {"decrypt": total_slots(spec)})
        store_paillier_key(self.guard.directory, private_key)
        register_guard(self.guard)

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        from datasites.runtime.key_authority_site import run_key_authority

        return _result(self.name, run_key_authority(
            site=self.name, job_id=self.spec.job_id, spec=self.spec.to_json(),
            keyring=self.keyring, action=action, payload=dumps(message)))

    def close(self) -> None:
        unregister_guard(self.guard)


def direct_paillier_federation(root: str | Path, spec: JobSpec,
                               frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]]
                               ) -> tuple[list[DirectSite], DirectAuthority, Any]:
    """Member sites and a key authority sharing one federation config (as provisioned);
    returns (sites, authority, the Paillier private key, for tests' ground truth only)."""
    from privacy.paillier import generate_keypair, public_key_to_str

    sites = direct_federation(root, spec, frames)
    public, private = generate_keypair(2048)
    authority = DirectAuthority("authority", Path(root) / "authority", spec, private, public)
    config = read_config(sites[0].guard.directory) | {
        "paillier_public_key": public_key_to_str(public),
        "authority_signing_key": ensure_signing_key(authority.guard.directory)}
    for directory in [*(s.guard.directory for s in sites), authority.guard.directory]:
        write_config(directory, config)
    return sites, authority, private
