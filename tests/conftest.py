"""Shared fixtures: small real tables, and ONE federation of real datasites per session."""

from __future__ import annotations

import pandas as pd
import pytest

from datasites.demo import BUNDLED_LABEL, BUNDLED_TABLE
from datasites.partition import dirichlet_split, train_test_split
from datasites.tables import FederationSchema, infer_schema, read_table

SITE_NAMES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="session")
def shuttle() -> pd.DataFrame:
    """The bundled ODDS shuttle table (real data)."""
    return read_table(BUNDLED_TABLE)


@pytest.fixture(scope="session")
def shuttle_small(shuttle: pd.DataFrame) -> pd.DataFrame:
    """2,400 real rows, stratified, so unit tests stay fast."""
    parts = [g.sample(frac=2400 / len(shuttle), random_state=0)
             for _, g in shuttle.groupby(BUNDLED_LABEL)]
    return pd.concat(parts).sample(frac=1.0, random_state=1).reset_index(drop=True)


@pytest.fixture(scope="session")
def schema(shuttle_small: pd.DataFrame) -> FederationSchema:
    return infer_schema(shuttle_small, BUNDLED_LABEL)


@pytest.fixture(scope="session")
def partitions(shuttle_small, schema):
    parts = dirichlet_split(shuttle_small, len(SITE_NAMES), by="f1", seed=0)
    return [train_test_split(p, 0.3, seed=i, label=schema.label) for i, p in enumerate(parts)]


@pytest.fixture(scope="session")
def federation(partitions, schema, tmp_path_factory):
    """Three real in-process PySyft datasites, started once for the whole session."""
    from datasites.federation import Federation

    fed = Federation.start(partitions, schema, root=tmp_path_factory.mktemp("federation"),
                           names=SITE_NAMES)
    yield fed
    fed.close()
