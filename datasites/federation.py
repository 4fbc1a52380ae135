"""Several in-process datasites and one data scientist: the demo and test federation."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from datasites.accounts import Account, Role, new_password
from datasites.datasite import Datasite
from datasites.scientist import ScientistSession
from datasites.tables import FederationSchema
from fed_tasks.spec import JobSpec


class Federation:
    """Provisions one datasite per (train, test) partition; closes them all on exit."""

    def __init__(self, sites: list[Datasite], scientist: Account, root: Path,
                 owns_root: bool) -> None:
        self.sites = sites
        self.scientist = scientist
        self.root = root
        self._owns_root = owns_root
        self._sessions: list[ScientistSession] | None = None

    @classmethod
    def start(cls, partitions: Sequence[tuple[pd.DataFrame, pd.DataFrame]],
              schema: FederationSchema, root: str | Path | None = None,
              names: Sequence[str] | None = None) -> Federation:
        names = list(names or [f"site-{i + 1}" for i in range(len(partitions))])
        if len(names) != len(partitions):
            raise ValueError("one name per partition")
        owns_root = root is None
        root_path = Path(root or tempfile.mkdtemp(prefix="fedsyft-"))
        scientist = Account("scientist@federation.org", Role.DATA_SCIENTIST, new_password(),
                            "Data scientist")
        sites: list[Datasite] = []
        try:
            for name, (train, test) in zip(names, partitions, strict=True):
                sites.append(Datasite.provision(name, root_path / name, train=train, test=test,
                                                schema=schema, scientist=scientist))
        except BaseException:
            for site in sites:
                site.close()
            if owns_root:
                shutil.rmtree(root_path, ignore_errors=True)
            raise
        return cls(sites, scientist, root_path, owns_root)

    def site(self, name: str) -> Datasite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites are {[s.name for s in self.sites]}")

    def sessions(self) -> list[ScientistSession]:
        """The data scientist logged in at every site (cached)."""
        if self._sessions is None:
            self._sessions = [ScientistSession(s.login(self.scientist.email,
                                                       self.scientist.password))
                              for s in self.sites]
        return self._sessions

    def submit(self, spec: JobSpec) -> dict[str, str]:
        """The data scientist submits ``spec`` everywhere: site name → request id."""
        return {sess.site: sess.submit(spec) for sess in self.sessions()}

    def approve_all(self, request_ids: dict[str, str]) -> None:
        """Every data owner reviews and approves (demo shortcut for the owners' step)."""
        for name, rid in request_ids.items():
            self.site(name).approve(rid)

    def connections(self, spec: JobSpec) -> list:
        return [sess.connection(spec) for sess in self.sessions()]

    def close(self) -> None:
        for site in self.sites:
            site.close()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
