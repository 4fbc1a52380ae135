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
from datasites.runtime.federation_config import ensure_signing_key, write_config
from datasites.runtime.site_entry import run_approved
from fed_tasks.codec import dumps, loads
from fed_tasks.interface import SiteRefusedError
from fed_tasks.spec import JobSpec


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
        envelope = loads(run_approved(site=self.name, job_id=self.spec.job_id,
                                      spec=self.spec.to_json(), train=self.train,
                                      test=self.test, action=action, payload=dumps(message)))
        if envelope["status"] != "ok":
            raise SiteRefusedError(self.name, str(envelope.get("reason", envelope["status"])))
        return envelope["result"]

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
