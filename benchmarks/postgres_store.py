"""Proof that a PySyft 0.9.5 datasite keeps its store in PostgreSQL, with timings.

Starts a throwaway cluster (tests/postgres_server.py), then: a Datasite with a
``postgresql://`` db_url, root login, a scientist account, a dataset with a small pandas
asset + mock and a >1 MB one (syft's blob store, on disk); stop; reopen with ``reset=False``
(same db_url, key and uid) and read the mocks as the scientist; reopen with ``reset=True``
and check it is wiped. Usage: ``python benchmarks/postgres_store.py``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import syft as sy
from syft.server.credentials import SyftSigningKey
from syft.server.datasite import Datasite
from syft.service.user.user_roles import ServiceRole
from syft.store.blob_storage.on_disk import (
    OnDiskBlobStorageClientConfig,
    OnDiskBlobStorageConfig,
)
from syft.types.uid import UID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_server import PostgresServer  # noqa: E402

ROOT, ROOT_PW = "root@site.org", "root-pw"
SCI, SCI_PW = "sci@site.org", "sci-pw"
timings: dict[str, float] = {}


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # syft prints the db_url, password too
        yield
    timings[step] = time.perf_counter() - t
    print(f"{step:<38} {timings[step]:7.2f} s")


def open_site(db_url: str, key: SyftSigningKey, uid: UID, blob_dir: Path, reset: bool) -> Any:
    blobs = OnDiskBlobStorageConfig(
        client_config=OnDiskBlobStorageClientConfig(base_directory=blob_dir), min_blob_size=1)
    return Datasite(name="pg-site", id=uid, signing_key=key, root_email=ROOT,
                    root_password=ROOT_PW, db_url=db_url, reset=reset, deployment_type="python",
                    in_memory_workers=True, blob_storage_config=blobs)


def close_site(server: Any) -> None:
    server.stop()
    server.db.engine.dispose()  # Datasite.stop() leaves the SQLAlchemy pool's connections open


def connections(pg: PostgresServer, db: str) -> int:
    return int(pg.sql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'").strip())


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pgstore-"))
    with timed("start PostgreSQL (initdb + pg_ctl)"):
        pg = PostgresServer.start(tmp / "pg")
    try:
        with timed("create role + database"):
            url = pg.create_database("site_a", "site_a", "s3cret-pw")
        print("db_url:", url.replace("s3cret-pw", "***"))
        key, uid = SyftSigningKey.generate(), UID()
        small = pd.DataFrame({"x": np.arange(5.0), "y": list("abcde")})
        big = pd.DataFrame(np.random.default_rng(0).random((40_000, 8)))  # ~2.5 MB > 1 MB

        with timed("Datasite(reset=True) on empty db"):
            server = open_site(url, key, uid, tmp / "blob", reset=True)
        print("  tables created:", pg.sql("SELECT count(*) FROM pg_tables WHERE "
                                          "schemaname='public'", db="site_a").strip())
        with timed("root login + create scientist"):
            root = server.get_guest_client(verbose=False).login(email=ROOT, password=ROOT_PW)
            res = root.users.create(email=SCI, name="Sci", password=SCI_PW,
                                    password_verify=SCI_PW, role=ServiceRole.DATA_SCIENTIST)
            assert not isinstance(res, sy.SyftError), res
        with timed("upload dataset (small + 2.5 MB asset)"):
            res = root.upload_dataset(sy.Dataset(name="d", asset_list=[
                sy.Asset(name="small", data=small, mock=small * 0),
                sy.Asset(name="big", data=big, mock=big * 0)]))
            assert not isinstance(res, sy.SyftError), res
        print("  connections open to site_a:", connections(pg, "site_a"))
        with timed("stop (+ engine.dispose)"):
            close_site(server)
        print("  connections after dispose:", connections(pg, "site_a"))

        with timed("Datasite(reset=False) reopen"):
            server = open_site(url, key, uid, tmp / "blob", reset=False)
        with timed("scientist login + read mocks"):
            sci = server.get_guest_client(verbose=False).login(email=SCI, password=SCI_PW)
            (ds,) = sci.datasets.get_all()
            got_small, got_big = ds.assets["small"].mock, ds.assets["big"].mock
        assert got_small.equals(small * 0) and got_big.shape == big.shape, "mock differs"
        print("  reopened: users =", len(root_users(server)), "| datasets =", len([ds]),
              "| mocks read back OK")
        close_site(server)

        with timed("Datasite(reset=True) reopen (wipe)"):
            server = open_site(url, key, uid, tmp / "blob", reset=True)
        root = server.get_guest_client(verbose=False).login(email=ROOT, password=ROOT_PW)
        n_ds, n_users = len(root.datasets.get_all()), len(root_users(server))
        print(f"  after reset=True: datasets = {n_ds}, users = {n_users} (root only)")
        assert n_ds == 0 and n_users == 1
        close_site(server)
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("OK")


def root_users(server: Any) -> list[Any]:
    root = server.get_guest_client(verbose=False).login(email=ROOT, password=ROOT_PW)
    return list(root.users.get_all())


if __name__ == "__main__":
    main()
