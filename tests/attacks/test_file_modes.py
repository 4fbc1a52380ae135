"""Attack: another local user reads a site's directory.

syft's store (``syft.db``) holds the private table in clear, and beside it lie the keys, the
approvals, the policy and privacy ledger, the audit log and the federation config. A site
directory must be 0700 and every file in it 0600, set by the site itself whatever the
process umask (issue 10, section 3 "Files").
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from datasites.governance.accounts import Account, Role
from datasites.governance.audit import AuditKeyError
from fed_tasks.spec import JobSpec

OWNER_PW = "owner-pass-123456"


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(directory: Path) -> dict[str, tuple[bool, int]]:
    """Every path under ``directory`` (itself as ".") → (is a directory, permission bits)."""
    out = {".": (True, stat.S_IMODE(os.lstat(directory).st_mode))}
    for here, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            st = os.lstat(Path(here) / name)
            out[str((Path(here) / name).relative_to(directory))] = (
                stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


def _loose(directory: Path) -> dict[str, str]:
    """Paths whose mode is not exactly 0700 (directories) / 0600 (everything else)."""
    return {path: f"{mode:o}" for path, (is_dir, mode) in _modes(directory).items()
            if mode != (0o700 if is_dir else 0o600)}


def _assert_owner_only(directory: Path, must_hold: tuple[str, ...]) -> None:
    modes = _modes(directory)
    missing = [name for name in must_hold if name not in modes]
    assert not missing, f"expected files absent from {directory}: {missing}"
    assert _loose(directory) == {}, f"not owner-only in {directory}"


# the files whose modes matter most, present in every data site's directory
SITE_FILES = ("syft.db", "site.json", "officer.json", "approvals.json", "audit.jsonl",
              "audit.head.json", "audit_key.pem", "audit_key.pub", "audit.lock", "site.lock",
              "server_signing_key", "server_uid", "policy.json", "public_mock_moments.json")


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_a_running_and_a_closed_site_are_owner_only_whatever_the_umask(
        mask, tmp_path, partitions, schema):
    """Provision two real sites (plus federation config) and run one approved call under a
    loose umask: while they run and after they close, the site directory is 0700 and every
    file in it (syft.db and its WAL files, keys, approvals, ledger, audit) is 0600."""
    from datasites.harness.federation import Federation

    names = [f"modes-{mask:03o}-{i}" for i in range(2)]
    with _umask(mask):
        fed = Federation.start(partitions[:2], schema, root=tmp_path / "fed", names=names,
                               key_authority=False)
        try:
            spec = JobSpec(features=schema.features, label_column=schema.label, rounds=1)
            ids = fed.submit(spec)
            fed.approve_all(ids)
            fed.sessions()[0].connection(spec).call("stats", {})  # a real private call
            for site in fed.sites:
                _assert_owner_only(site.directory, (*SITE_FILES, "federation.json",
                                                    "contribution_key.pem"))
            wal = fed.sites[0].directory / "syft.db-wal"
            assert wal.exists()  # syft runs sqlite in WAL mode: the sidecar holds rows too
        finally:
            fed.close()
        for site in fed.sites:
            _assert_owner_only(site.directory, SITE_FILES)


@pytest.fixture(scope="module")
def closed_site(partitions, schema, tmp_path_factory) -> Path:
    """A provisioned, then closed, site, provisioned under umask 0 (the loosest)."""
    from datasites.runtime.datasite import Datasite

    directory = tmp_path_factory.mktemp("modes") / "modes-reopen"
    train, test = partitions[2]
    with _umask(0):
        site = Datasite.provision("modes-reopen", directory, train=train, test=test,
                                  schema=schema, owner_password=OWNER_PW,
                                  scientist=Account("ds@modes.org", Role.DATA_SCIENTIST,
                                                    "scientist-pass-1"))
        site.close()
    _assert_owner_only(directory, SITE_FILES)
    return directory


def test_open_restores_modes_someone_loosened_and_logs_it(closed_site):
    """A careful operator expects the site to close the exposure at once, before anything
    starts, and to leave a trace of it: open makes everything owner-only again and writes
    ``file_modes_repaired`` with the former modes (so the officer sees syft.db was open)."""
    from datasites.runtime.datasite import Datasite

    for name in ("syft.db", "approvals.json", "site.json", "audit.jsonl"):
        os.chmod(closed_site / name, 0o644)
    os.chmod(closed_site / "blob", 0o755)
    os.chmod(closed_site, 0o644)
    site = Datasite.open(closed_site, "owner@modes-reopen.site", OWNER_PW)
    try:
        assert _loose(closed_site) == {}
        [entry] = site.guard.audit.entries(action="file_modes_repaired")
        assert entry["params"]["changed"] == {".": "644", "approvals.json": "644",
                                              "audit.jsonl": "644", "blob": "755",
                                              "site.json": "644", "syft.db": "644"}
    finally:
        site.close()
    _assert_owner_only(closed_site, SITE_FILES)


def test_open_refuses_an_audit_key_others_could_read_but_still_closes_the_rest(closed_site):
    """The signing key that proves the audit log is not silently repaired: if others could
    read it, opening is refused (the operator decides whether to rotate it); every other
    file has been made owner-only anyway."""
    from datasites.runtime.datasite import Datasite

    os.chmod(closed_site / "audit_key.pem", 0o644)
    os.chmod(closed_site / "syft.db", 0o644)
    try:
        with pytest.raises(AuditKeyError, match="chmod 600"):
            Datasite.open(closed_site, "owner@modes-reopen.site", OWNER_PW)
        assert _loose(closed_site) == {"audit_key.pem": "644"}
    finally:
        os.chmod(closed_site / "audit_key.pem", 0o600)


def test_the_sweep_never_touches_a_directory_that_is_not_a_site(tmp_path):
    """A mistyped path (a home directory, say) is refused, not chmodded recursively."""
    from datasites.runtime.datasite import Datasite
    from datasites.runtime.site_files import SiteDirectoryError

    (tmp_path / "notes.txt").write_text("x")
    os.chmod(tmp_path / "notes.txt", 0o644)
    before = _modes(tmp_path)
    with pytest.raises(SiteDirectoryError, match="not a fedsyft site directory"):
        Datasite.open(tmp_path, "owner@x.site", OWNER_PW)
    assert _modes(tmp_path) == before
