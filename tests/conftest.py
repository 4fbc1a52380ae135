"""Shared fixtures: small real tables, and ONE federation of real datasites per session."""

from __future__ import annotations

import pandas as pd
import pytest

from datasites.harness.demo import BUNDLED_LABEL, BUNDLED_TABLE
from datasites.harness.partition import dirichlet_split, train_test_split
from datasites.runtime.tables import FederationSchema, infer_schema, read_table

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


#: test files that take a minute or more, longest first (measured with --durations): the
#: two ``make test`` workers take whole files in this order, so starting the long ones
#: first lets both finish together instead of one running a long file alone at the end
SLOW_FIRST = ("tests/test_cli.py", "tests/deployment/test_deploy_cli.py",
              "tests/deployment/test_resume.py", "tests/deployment/test_notebooks.py",
              "tests/test_detectors.py", "tests/deployment/test_postgres.py",
              "tests/attacks/test_crafted_model.py", "tests/test_kill.py",
              "tests/deployment/test_http_federation.py", "tests/test_dp_usefulness.py",
              "tests/test_compression.py", "tests/test_secure_aggregation.py",
              "tests/test_dp_sites.py", "tests/test_async_rounds.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow files first (in ``SLOW_FIRST`` order), then the rest as collected; the
    order within a file is kept (``make test`` passes ``--no-loadscope-reorder``)."""
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the rest keep their collected order


@pytest.fixture(scope="session")
def schema(shuttle_small: pd.DataFrame) -> FederationSchema:
    return infer_schema(shuttle_small, BUNDLED_LABEL)


@pytest.fixture(scope="session")
def partitions(shuttle_small, schema):
    parts = dirichlet_split(shuttle_small, len(SITE_NAMES), by="f1", seed=0)
    return [train_test_split(p, 0.3, seed=i, label=schema.label) for i, p in enumerate(parts)]


@pytest.fixture(scope="session")
def four_sites(shuttle_small, schema):
    """Four institutions' (train, test) frames, non-IID, for in-process site tests."""
    parts = dirichlet_split(shuttle_small, 4, by="f1", seed=3)
    return {f"inst-{i}": train_test_split(p, 0.3, seed=i, label=schema.label)
            for i, p in enumerate(parts)}


@pytest.fixture(scope="session")
def federation(partitions, schema, tmp_path_factory):
    """Three real in-process PySyft datasites, started once for the whole session."""
    from datasites.harness.federation import Federation

    fed = Federation.start(partitions, schema, root=tmp_path_factory.mktemp("federation"),
                           names=SITE_NAMES)
    yield fed
    fed.close()


def plain_rounds(conns, spec, rounds: int):
    """Drive sites through statistics and ``rounds`` plain training rounds, the way the
    orchestrator does (each call carries the evidence of the previous aggregate)."""
    from fed_tasks.aggregation import PlainSum
    from fed_tasks.site_step import vector_length

    agg = PlainSum(1)
    agg.submit(conns, "stats", {}, vector_length(spec, "stats"))
    for rnd in range(1, rounds + 1):
        agg.submit(conns, "fit", {"round": rnd, "previous": agg.evidence()},
                   vector_length(spec, "fit"))
    return agg


@pytest.fixture
def drive():
    """:func:`plain_rounds` for tests that call sites directly."""
    return plain_rounds


def publish_mocks(sites, frames, schema):
    """Give in-process sites a published mock of their train split (a DP job's statistics
    come from it) and a budget no test exhausts."""
    from datasites.runtime.tables import make_mock

    for site, (train, test) in zip(sites, frames.values(), strict=True):
        site.guard.register_assets({"train": train, "test": test},
                                   {"train": make_mock(train, schema), "test": test})
        privacy = site.guard.privacy
        privacy.set_policy(privacy.policy().model_copy(update={"epsilon_budget": 1e9}),
                           "owner@direct.site", "test budget")
    return sites


def dp_direct_sites(root, spec, frames, schema):
    """In-process sites running the real site code (:func:`direct_federation`) with
    published mocks (:func:`publish_mocks`)."""
    from datasites.runtime.direct import direct_federation

    return publish_mocks(direct_federation(root, spec, frames), frames, schema)


@pytest.fixture
def dp_sites():
    """:func:`dp_direct_sites` for tests that need sites with published mocks."""
    return dp_direct_sites


@pytest.fixture
def with_mocks():
    """:func:`publish_mocks` for tests that build their sites otherwise (a key authority)."""
    return publish_mocks
