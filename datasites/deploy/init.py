"""``fedsyft init DIR``: an example federation that ``fedsyft up`` runs as it is.

One table per institution, cut from a public table the way the demo cuts it (non-IID by
the first feature's quantiles, Dirichlet alpha 0.5, seeded), so a deployment trains on
exactly the demo's rows; each site splits its own table into train and test at
provisioning, as the demo does. Columns constant over the whole table and ``drop_columns``
are left out of the site tables (the demo's rule). A series (``time_column``) is cut into
consecutive segments instead, one per site, each kept whole (the demo's rule for series).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from datasites.deploy.config import ConfigError
from datasites.harness.partition import SERIES_MIN_ROWS, contiguous_split, dirichlet_split
from datasites.runtime.tables import check_time_role, inspect_tables, read_table

CONFIG_NAME = "federation.toml"

_HEADER = """\
# A fedsyft federation: one datasite server per institution, on this host's loopback.
# Passwords are never in this file: FEDSYFT_OWNER_PASSWORD[_SITE], FEDSYFT_OFFICER_PASSWORD
# [_SITE] and FEDSYFT_SCIENTIST_PASSWORD, or a prompt. Paths are relative to this file.
#   fedsyft up --config {config}        start (and, the first time, provision) every site
#   fedsyft status --config {config}    who is up, pending requests, audit chains
#   fedsyft down --config {config}      stop them cleanly

[federation]
name = "example"
scientist = "scientist@federation.org"   # the data scientist's account at every site
min_sites = 2                            # the smallest aggregate any site accepts
seed = {seed}                               # the sites' train/test splits
"""

_SITE = """
[[site]]
name = "{name}"
host = "127.0.0.1"
port = {port}
directory = "sites/{name}"
data = "data/{name}.csv"
label_column = "{label}"{time}
store = "sqlite"                         # or a postgresql:// URL
owner = "owner@{name}.example"
officer = "officer@{name}.example"
"""

_AUTHORITY = """
# Decrypts only verified sums of Paillier jobs; holds no data.
[key_authority]
name = "key-authority"
host = "127.0.0.1"
port = {port}
directory = "sites/key-authority"
store = "sqlite"
owner = "owner@key-authority.example"
officer = "officer@key-authority.example"
"""


def write_example(directory: Path, data: Path, label_column: str, sites: int, seed: int,
                  base_port: int, drop_columns: tuple[str, ...] = (),
                  log: Callable[[str], Any] = lambda _: None,
                  time_column: str | None = None) -> Path:
    """Write DIR/federation.toml and DIR/data/site-N.csv; returns the config's path. ``log``
    gets the warning naming constant columns left out. With ``time_column`` the table is
    one series: the site tables are its consecutive segments, times written in ISO 8601
    UTC, and each site's config names its time column."""

    directory = Path(directory)
    config = directory / CONFIG_NAME
    if config.exists():
        raise ConfigError(f"{config} already exists; choose an empty directory")
    if directory.exists() and (directory / "data").exists():
        raise ConfigError(f"{directory / 'data'} already exists; choose an empty directory")
    check_time_role(time_column, label_column, drop_columns)
    frame = read_table(data, time_column=time_column)
    found = inspect_tables(frame, label_column, drop_columns, names=[str(data)],
                           time=time_column)
    if found.warning():
        log(found.warning())
    frame, schema = found.select(frame), found.schema
    if time_column is None:
        parts = dirichlet_split(frame, sites, by=schema.features[0], alpha=0.5, seed=seed)
    else:
        parts = [p.assign(**{time_column: pd.to_datetime(p[time_column], unit="s", utc=True)
                             .dt.strftime("%Y-%m-%dT%H:%M:%SZ")})
                 for p in contiguous_split(frame, sites, SERIES_MIN_ROWS)]
    names = [f"site-{i + 1}" for i in range(sites)]
    (directory / "data").mkdir(parents=True, exist_ok=True)
    for name, part in zip(names, parts, strict=True):
        part.to_csv(directory / "data" / f"{name}.csv", index=False)
    text = _HEADER.format(config=config, seed=seed)
    time = f"\ntime_column = {json.dumps(time_column)}" if time_column else ""
    for i, name in enumerate(names):
        text += _SITE.format(name=name, port=base_port + i, label=label_column, time=time)
    text += _AUTHORITY.format(port=base_port + sites)
    config.write_text(text)
    return config
