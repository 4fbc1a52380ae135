"""ONE running federation of HTTP datasite servers for the deployment tests.

Three sites and the key authority, each its own ``fedsyft up`` server process on loopback,
holding the same rows as the session's in-process federation (the conftest partitions:
same parts, same train/test seeds), so both can be compared weight for weight.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SITE_NAMES = ("hospital-a", "hospital-b", "hospital-c")  # as the session federation's

PASSWORDS = {"FEDSYFT_OWNER_PASSWORD": "Owner-pass-4f9a2c",
             "FEDSYFT_OFFICER_PASSWORD": "Officer-pass-8d1e7b",
             "FEDSYFT_SCIENTIST_PASSWORD": "Scientist-pass-3c6f0a"}
FEDSYFT = [sys.executable, "-m", "datasites.cli.main"]


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_config(root: Path, parts: list[pd.DataFrame], names: list[str], ports: list[int],
                 authority: bool = True, extra: str = "") -> Path:
    """A federation.toml over ``parts`` (one table per site) in ``root``."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    text = ('[federation]\nname = "test"\nscientist = "scientist@federation.org"\n'
            "min_sites = 2\nseed = 0\n" + extra)
    for name, part, port in zip(names, parts, ports, strict=False):
        part.to_csv(root / "data" / f"{name}.csv", index=False)
        text += (f'\n[[site]]\nname = "{name}"\nport = {port}\ndirectory = "sites/{name}"\n'
                 f'data = "data/{name}.csv"\nowner = "owner@{name}.example"\n'
                 f'officer = "officer@{name}.example"\n')
    if authority:
        text += (f'\n[key_authority]\nport = {ports[len(names)]}\n'
                 'directory = "sites/key-authority"\nowner = "owner@ka.example"\n'
                 'officer = "officer@ka.example"\n')
    path = root / "federation.toml"
    path.write_text(text)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDSYFT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **PASSWORDS, **(env or {})},
                          cwd=Path(__file__).parents[2])


@pytest.fixture(scope="session")
def site_parts(shuttle_small):
    from datasites.harness.partition import dirichlet_split

    return dirichlet_split(shuttle_small, len(SITE_NAMES), by="f1", seed=0)


@pytest.fixture(scope="session")
def deployed(site_parts, tmp_path_factory):
    """``fedsyft up`` of three sites and a key authority; ``fedsyft down`` at the end."""
    root = tmp_path_factory.mktemp("deployed")
    config = write_config(root, site_parts, list(SITE_NAMES), free_ports(4))
    up = run_cli("up", "--config", str(config))
    assert up.returncode == 0, up.stderr
    from datasites.deploy.config import load

    yield load(config)
    run_cli("down", "--config", str(config))
