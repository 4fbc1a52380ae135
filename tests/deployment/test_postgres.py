"""A site whose syft store is PostgreSQL (a real server the test starts), end to end:
``fedsyft up``, a job trained over HTTP, ``down`` / ``up`` with everything intact."""

from __future__ import annotations

import numpy as np
import pytest
from postgres_server import PostgresServer

from .conftest import PASSWORDS, free_ports, run_cli, write_config
from .test_http_federation import _spec, in_process

NAMES = ["clinic-pg", "clinic-sqlite"]
STORE_PASSWORD = "Store-pw-7d2e9a"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    server = PostgresServer.start(tmp_path_factory.mktemp("pg"))
    server.create_database("clinic_pg", "clinic_pg", STORE_PASSWORD)
    yield server
    server.stop()


def test_a_postgresql_site_trains_and_restarts_intact(postgres, site_parts, tmp_path):
    from datasites.deploy.config import load
    from datasites.deploy.remote import OwnerClient, RemoteFederation
    from datasites.harness.partition import train_test_split

    parts = [p.iloc[:400].reset_index(drop=True) for p in site_parts[:2]]
    config = write_config(tmp_path, parts, NAMES, free_ports(2), authority=False)
    text = config.read_text().replace(
        'directory = "sites/clinic-pg"',
        'directory = "sites/clinic-pg"\n'
        f'store = "postgresql://clinic_pg@127.0.0.1:{postgres.port}/clinic_pg"', 1)
    config.write_text(text)
    env = {"FEDSYFT_STORE_PASSWORD_CLINIC_PG": STORE_PASSWORD}
    try:
        up = run_cli("up", "--config", str(config), env=env)
        assert up.returncode == 0, up.stderr
        cfg = load(config)
        pg_site = cfg.member("clinic-pg")
        assert not (pg_site.directory / "syft.db").exists()  # the store is in PostgreSQL
        users = postgres.sql('SELECT count(*) FROM "User";', db="clinic_pg").strip()
        assert int(users) >= 3  # root, owner, scientist

        fed = RemoteFederation.connect(cfg, password=PASSWORDS["FEDSYFT_SCIENTIST_PASSWORD"])
        spec = _spec(_schema(parts), "plain", rounds=2)
        for name, rid in fed.submit(spec).items():
            m = cfg.member(name)
            OwnerClient(m, m.owner, PASSWORDS["FEDSYFT_OWNER_PASSWORD"]).approve(rid)
        result = fed.trainer(spec, progress=False).fit()
        splits = [train_test_split(p, 0.3, seed=i, label="anomaly")
                  for i, p in enumerate(parts)]
        expected = in_process(spec, splits, NAMES).fit()
        np.testing.assert_allclose(result.weights, expected.weights, atol=1e-6)

        assert run_cli("down", "--config", str(config), "--site", "clinic-pg").returncode == 0
        again = run_cli("up", "--config", str(config), "--site", "clinic-pg")
        assert again.returncode == 0, again.stderr  # no password needed to restart
        fresh = RemoteFederation.connect(cfg, password=PASSWORDS["FEDSYFT_SCIENTIST_PASSWORD"])
        assert fresh.approvals(spec)["clinic-pg"] == "approved"  # syft's store survived
        trainer = fresh.trainer(spec, progress=False)
        assert trainer.evaluate(result)  # the guard's approval and the model state too
        log = (pg_site.directory / "server.log").read_text()
        assert STORE_PASSWORD not in log and STORE_PASSWORD not in up.stdout + up.stderr
    finally:
        run_cli("down", "--config", str(config))


def _schema(parts):
    from datasites.runtime.tables import infer_schema

    return infer_schema(parts[0], "anomaly")


def test_a_wrong_store_password_is_one_line_without_it(postgres, site_parts, tmp_path):
    parts = [p.iloc[:200].reset_index(drop=True) for p in site_parts[:2]]
    config = write_config(tmp_path, parts, NAMES, free_ports(2), authority=False)
    config.write_text(config.read_text().replace(
        'directory = "sites/clinic-pg"',
        'directory = "sites/clinic-pg"\n'
        f'store = "postgresql://clinic_pg@127.0.0.1:{postgres.port}/clinic_pg"', 1))
    wrong = "Not-the-pw-1234"
    proc = run_cli("up", "--config", str(config),
                   env={"FEDSYFT_STORE_PASSWORD_CLINIC_PG": wrong})
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "PostgreSQL store" in line and "clinic-pg" in line
    assert wrong not in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "sites" / "clinic-pg").exists()  # nothing half-provisioned
