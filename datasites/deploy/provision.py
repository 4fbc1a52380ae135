"""First start of a federation from its ``federation.toml``: every member provisioned.

Members are provisioned together because each site's ``federation.json`` names every
member's signing key (what the owners agree on out of band, see ``federation.py``). The
build is all-or-nothing, as for the demo: staging directories, moved into place only when
every member is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from datasites.deploy.config import (
    ConfigError,
    FederationFile,
    MemberConfig,
    SiteConfig,
    password_env,
    password_for,
)
from datasites.errors import ProvisioningError
from datasites.governance.accounts import Account, Role
from datasites.harness.federation import configure_members
from datasites.harness.partition import train_test_split
from datasites.runtime.datasite import Datasite
from datasites.runtime.key_authority_site import KeyAuthoritySite
from datasites.runtime.site_files import SiteDirectoryError, read_site_info
from datasites.runtime.tables import FederationSchema, TableError, read_table, validate


def is_provisioned(directory: Path) -> bool:
    try:
        read_site_info(directory)
    except SiteDirectoryError:
        return False
    return True


def site_tables(cfg: FederationFile) -> tuple[FederationSchema, dict[str, tuple[pd.DataFrame,
                                                                             pd.DataFrame]]]:
    """Each site's table, checked against the federation's schema (the first site's header),
    then split into train and test with the federation's seed. A series site (its
    ``time_column``) keeps its whole series, in time order, as both: it is evaluated on
    all of it (labels only at evaluation), as in the demo."""
    schema: FederationSchema | None = None
    splits = {}
    for i, site in enumerate(cfg.site):
        frame = _read(site)
        if site.time_column != cfg.site[0].time_column:
            raise ConfigError(f"site {site.name!r}: time_column {site.time_column!r} differs "
                              f"from site {cfg.site[0].name!r}'s ({cfg.site[0].time_column!r})")
        others = (site.label_column, site.time_column)
        if schema is None:
            schema = FederationSchema(tuple(str(c) for c in frame.columns if c not in others),
                                      site.label_column, site.time_column)
        elif [c for c in frame.columns if c not in others] != list(schema.features):
            raise ConfigError(f"site {site.name!r}: data file {site.data} has columns "
                              f"{list(frame.columns)}, not those of site "
                              f"{cfg.site[0].name!r} ({list(schema.columns)})")
        validate(frame.loc[:, list(schema.columns)], schema,
                 where=f"site {site.name!r} data file {site.data}", min_rows=3)
        if site.time_column is not None:
            splits[site.name] = (frame, frame)
            continue
        splits[site.name] = train_test_split(frame, site.test_fraction,
                                             seed=cfg.federation.seed + i,
                                             label=site.label_column)
    assert schema is not None
    return schema, splits


def _read(site: SiteConfig) -> pd.DataFrame:
    try:
        frame = read_table(site.data, time_column=site.time_column)
    except TableError as exc:
        raise ConfigError(f"site {site.name!r}: {exc}") from None
    if site.label_column not in frame.columns:
        raise ConfigError(f"site {site.name!r}: data file {site.data} has no label column "
                          f"{site.label_column!r} (label_column in the config)")
    return frame


def store_with_password(cfg: FederationFile, member: MemberConfig) -> str | None:
    """A PostgreSQL store's URL with its password (from ``FEDSYFT_STORE_PASSWORD[_SITE]``
    or a prompt; never in the config), or None for the sqlite store. Kept in the site's
    directory (0600), like its keys, so its server can reopen the store on every start."""
    if member.store == "sqlite":
        return None
    parts = urlsplit(member.store)
    where = f"{cfg.path}: site {member.name!r}: store"
    if parts.password:
        raise ConfigError(f"{where} holds a password; remove it and set "
                          f"{password_env('store', member.name)[0]} instead")
    if not parts.username or not parts.hostname or not parts.port or len(parts.path) < 2:
        raise ConfigError(f"{where} must be postgresql://USER@HOST:PORT/DATABASE")
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise ConfigError(f"{where}: the database must be on this host (127.0.0.1)")
    password = password_for("store", member.name)
    if not set(str(password)) <= _URL_SAFE:  # syft never percent-decodes its db_url
        raise ConfigError(f"the store password of site {member.name!r} may hold only letters, "
                          "digits and -._~ (syft does not decode its database URL)")
    return (f"postgresql://{parts.username}:{password}@{parts.hostname}:{parts.port}"
            f"{parts.path}")


_URL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")


def provision(cfg: FederationFile) -> list[str]:
    """Provision every member of ``cfg`` that has no site yet; returns their names.

    Either no member is provisioned yet (first start: all are), or all are (nothing to do).
    A federation half-provisioned by hand is refused: joining a new member to running ones
    would change every member's federation facts, which this version does not do."""
    done = {m.name: is_provisioned(m.directory) for m in cfg.members}
    if all(done.values()):
        return []
    if any(done.values()):
        missing = [n for n, ok in done.items() if not ok]
        raise ProvisioningError(
            f"{cfg.path}: members {missing} have no site yet while the others do; a member "
            "cannot join a provisioned federation (start a new federation, or restore its "
            "directory)")
    stores = {m.name: store_with_password(cfg, m) for m in cfg.members}
    for m in cfg.members:
        if m.directory.exists() and any(m.directory.iterdir()):
            raise ConfigError(f"{cfg.path}: site {m.name!r}: directory {m.directory} is not "
                              "empty and holds no fedsyft site")
    schema, splits = site_tables(cfg)
    scientist = Account(cfg.federation.scientist, Role.DATA_SCIENTIST,
                        password_for("scientist"), "Data scientist")
    passwords = {m.name: (password_for("owner", m.name), password_for("officer", m.name))
                 for m in cfg.members}
    sites: list[Datasite] = []
    authority: KeyAuthoritySite | None = None
    try:
        for s in cfg.site:
            train, test = splits[s.name]
            s.directory.parent.mkdir(parents=True, exist_ok=True)
            owner, officer = passwords[s.name]
            sites.append(Datasite.provision(
                s.name, s.directory, train=train, test=test, schema=schema,
                scientist=scientist, owner_email=s.owner, owner_password=owner,
                officer_email=s.officer, officer_password=officer, commit=False,
                store=stores[s.name]))
        ka = cfg.key_authority
        if ka is not None:
            ka.directory.parent.mkdir(parents=True, exist_ok=True)
            owner, officer = passwords[ka.name]
            authority = KeyAuthoritySite.provision_authority(
                ka.name, ka.directory, scientist, ka.key_bits, owner_email=ka.owner,
                owner_password=owner, officer_email=ka.officer, officer_password=officer,
                commit=False, store=stores[ka.name])
        configure_members(sites, authority, cfg.federation.min_sites)
        committed = [site.commit() for site in sites]
        sites = []
        for site in committed:
            site.close()
        if authority is not None:
            authority.commit().close()
            authority = None
    except BaseException:
        for site in [*sites, *([authority] if authority else [])]:
            site.discard()
        for m in cfg.members:  # a member committed before the failure is removed too
            if m.directory.exists() and not done[m.name]:
                shutil.rmtree(m.directory, ignore_errors=True)
        raise
    return [m.name for m in cfg.members]
