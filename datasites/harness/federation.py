"""Several in-process datasites and one data scientist: the demo and test federation."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from datasites.adapter.scientist import ScientistSession
from datasites.errors import ProvisioningError
from datasites.governance.accounts import Account, Role, new_password
from datasites.runtime.datasite import Datasite
from datasites.runtime.federation_config import ensure_signing_key, write_config
from datasites.runtime.key_authority_site import KeyAuthoritySite
from datasites.runtime.site_files import leftover_message, leftovers
from datasites.runtime.tables import FederationSchema
from fed_tasks.aggregation import KeyAuthoritySum, MaskedSum, PlainSum, SecureSum
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.spec import JobSpec

KEY_AUTHORITY = "key-authority"  # the authority's site name (and directory) in a federation


def configure_members(sites: list[Datasite], authority: KeyAuthoritySite | None,
               min_sites: int) -> None:
    """What the owners agree on out of band: members, their signing keys, the authority's
    public key, and the smallest aggregate the authority will ever decrypt."""
    config = {
        "key_authority": authority.name if authority else None,
        "paillier_public_key": authority.public_key if authority else None,
        "sites": {s.name: ensure_signing_key(s.directory) for s in sites},
        "max_sites": len(sites),
        "min_sites": max(2, min_sites),
        # each site keeps the other members' signed audit heads as receipts (receipts.py)
        "audit_keys": {s.name: (s.directory / "audit_key.pub").read_text() for s in sites},
        # the sites accept a Paillier aggregate only with this key's signature
        "authority_signing_key": ensure_signing_key(authority.directory) if authority else None,
    }
    for member in [*sites, *([authority] if authority else [])]:
        write_config(member.directory, config)


class Federation:
    """Provisions one datasite per (train, test) partition; closes them all on exit."""

    def __init__(self, sites: list[Datasite], scientist: Account, root: Path,
                 owns_root: bool, authority: KeyAuthoritySite | None = None) -> None:
        self.sites = sites
        self.authority = authority
        self.scientist = scientist
        self.root = root
        self._owns_root = owns_root
        self._sessions: list[ScientistSession] | None = None
        self._authority_session: ScientistSession | None = None

    @classmethod
    def start(cls, partitions: Sequence[tuple[pd.DataFrame, pd.DataFrame]],
              schema: FederationSchema, root: str | Path | None = None,
              names: Sequence[str] | None = None, key_authority: bool = True,
              min_sites: int = 2, key_bits: int = 2048, authority_name: str = KEY_AUTHORITY,
              passwords: Mapping[str, Mapping[str, str]] | None = None) -> Federation:
        """Provision the sites (and a key authority for Paillier jobs), then configure
        every member with the federation's public facts (see ``federation_config``).

        ``passwords`` maps a site name to its ``"owner"`` / ``"officer"`` passwords (else
        random); with ``root`` given, the site directories outlive the federation.
        """
        names = list(names or [f"site-{i + 1}" for i in range(len(partitions))])
        if len(names) != len(partitions):
            raise ValueError("one name per partition")
        owns_root = root is None
        root_path = Path(root or tempfile.mkdtemp(prefix="fedsyft-"))
        found = leftovers(root_path)
        if found:
            raise ProvisioningError(leftover_message(found))
        scientist = Account("scientist@federation.org", Role.DATA_SCIENTIST, new_password(),
                            "Data scientist")
        sites: list[Datasite] = []
        authority = None
        try:
            for name, (train, test) in zip(names, partitions, strict=True):
                chosen = (passwords or {}).get(name, {})
                sites.append(Datasite.provision(name, root_path / name, train=train, test=test,
                                                schema=schema, scientist=scientist,
                                                owner_password=chosen.get("owner"),
                                                officer_password=chosen.get("officer"),
                                                commit=False))
            if key_authority:
                chosen = (passwords or {}).get(authority_name, {})
                authority = KeyAuthoritySite.provision_authority(
                    authority_name, root_path / authority_name, scientist, key_bits,
                    owner_password=chosen.get("owner"), officer_password=chosen.get("officer"),
                    commit=False)
            configure_members(sites, authority, min_sites)
            # every member is complete (config included): only now do they move into place
            sites = [site.commit() for site in sites]
            authority = authority.commit() if authority else None
        except BaseException:
            for site in [*sites, *([authority] if authority else [])]:
                site.discard()
            if owns_root:
                shutil.rmtree(root_path, ignore_errors=True)
            raise
        return cls(sites, scientist, root_path, owns_root, authority)

    def site(self, name: str) -> Datasite:
        for s in [*self.sites, *([self.authority] if self.authority else [])]:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites are {[s.name for s in self.sites]}")

    def authority_session(self) -> ScientistSession:
        if self.authority is None:
            raise RuntimeError("this federation has no key authority")
        if self._authority_session is None:
            client = self.authority.login(self.scientist.email, self.scientist.password)
            self._authority_session = ScientistSession(client, kind="authority")
        return self._authority_session

    def sessions(self) -> list[ScientistSession]:
        """The data scientist logged in at every site (cached)."""
        if self._sessions is None:
            self._sessions = [ScientistSession(s.login(self.scientist.email,
                                                       self.scientist.password))
                              for s in self.sites]
        return self._sessions

    def submit(self, spec: JobSpec) -> dict[str, str]:
        """The data scientist submits ``spec`` everywhere (and to the key authority for a
        Paillier job): site name → request id."""
        ids = {sess.site: sess.submit(spec) for sess in self.sessions()}
        if spec.aggregation == "paillier":
            session = self.authority_session()
            ids[session.site] = session.submit(spec)
        return ids

    def approve_all(self, request_ids: dict[str, str]) -> None:
        """Every data owner reviews and approves (demo shortcut for the owners' step)."""
        for name, rid in request_ids.items():
            self.site(name).approve(rid)

    def connections(self, spec: JobSpec) -> list:
        return [sess.connection(spec) for sess in self.sessions()]

    def secure_sum(self, spec: JobSpec) -> SecureSum:
        """How the orchestrator sums the sites' vectors for ``spec``."""
        if spec.aggregation == "paillier":
            return KeyAuthoritySum(self.authority_session().connection(spec))
        if spec.aggregation == "plain":
            return PlainSum(spec.min_sites)
        if spec.aggregation == "secagg":
            return MaskedSum(spec, len(self.sites))
        raise ValueError(f"aggregation {spec.aggregation!r} is not available yet")

    def trainer(self, spec: JobSpec, **kwargs) -> FederatedTrainer:
        """A trainer wired to this federation's sites and the job's secure sum."""
        return FederatedTrainer(spec, self.connections(spec), secure_sum=self.secure_sum(spec),
                                **kwargs)

    def close(self) -> None:
        for site in [*self.sites, *([self.authority] if self.authority else [])]:
            site.close()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
