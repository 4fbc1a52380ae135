"""All-or-nothing provisioning, damaged stores, checks before provisioning, and the key
authority's passwords (issue 11, "No half-built or silently recreated state").

One small federation (two sites and a key authority, kept in a directory) for the module;
each damage is done to a copy of one of its sites, so the others stay intact.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from datasites.cli.main import app
from datasites.errors import ProvisioningError
from datasites.runtime.site_files import COMPLETE_FILE, SiteDirectoryError

OWNER_PW = "owner-pass-3306"
OFFICER_PW = "officer-pass-8814"
AUTH_OWNER_PW = "authority-pass-4471"


AUTHORITY = "authority-kept"  # not the session federation's running "key-authority"


@pytest.fixture(scope="module")
def kept(partitions, schema, tmp_path_factory):
    """A closed federation in ``root``: site-a, site-b and the key authority."""
    from datasites.harness.federation import Federation

    root = tmp_path_factory.mktemp("kept")
    passwords = {n: {"owner": OWNER_PW, "officer": OFFICER_PW} for n in ("site-a", "site-b")}
    passwords[AUTHORITY] = {"owner": AUTH_OWNER_PW, "officer": OFFICER_PW}
    fed = Federation.start(partitions[:2], schema, root=root, names=["site-a", "site-b"],
                           key_authority=True, passwords=passwords, authority_name=AUTHORITY)
    fed.close()
    return root


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _copy(kept: Path, tmp_path: Path, name: str = "site-a") -> Path:
    dest = tmp_path / name
    shutil.copytree(kept / name, dest)
    (dest / "site.lock").unlink(missing_ok=True)
    return dest


def test_provisioned_sites_are_complete_and_nothing_temporary_is_left(kept):
    from datasites.runtime.datasite import Datasite

    assert sorted(p.name for p in kept.iterdir()) == [AUTHORITY, "site-a", "site-b"]
    for name in ("site-a", "site-b"):
        assert (kept / name / COMPLETE_FILE).is_file()
        assert (kept / name / "federation.json").is_file()  # configured before the move
        Datasite.open(kept / name, f"owner@{name}.site", OWNER_PW).close()


def test_key_authority_opens_with_the_chosen_password(kept):
    """Item 4: the authority's directory is usable by its owner (password set or printed)."""
    from datasites.cli.main import _kept_site_passwords
    from datasites.runtime.key_authority_site import KeyAuthoritySite

    KeyAuthoritySite.open(kept / AUTHORITY, f"owner@{AUTHORITY}.site", AUTH_OWNER_PW).close()
    chosen = _kept_site_passwords(kept.parent / "fresh-dir", 2, authority=True)
    assert set(chosen) == {"site-1", "site-2", "key-authority"}


def test_half_built_site_is_refused(kept, tmp_path):
    from datasites.runtime.datasite import Datasite

    site = _copy(kept, tmp_path)
    (site / COMPLETE_FILE).unlink()
    before = _digests(site)
    with pytest.raises(SiteDirectoryError, match="half-built site"):
        Datasite.open(site, "owner@site-a.site", OWNER_PW)
    assert _digests(site) == before


def test_leftover_is_named_and_never_a_site(kept, tmp_path):
    from datasites.runtime.datasite import Datasite

    leftover = tmp_path / ".site-a.provisioning-0badc0de"
    shutil.copytree(kept / "site-a", leftover)
    with pytest.raises(SiteDirectoryError, match="interrupted provisioning"):
        Datasite.open(leftover, "owner@site-a.site", OWNER_PW)
    with pytest.raises(SiteDirectoryError, match=f"left {leftover}; remove it"):
        Datasite.open(tmp_path / "site-a", "owner@site-a.site", OWNER_PW)
    with pytest.raises(ProvisioningError, match="interrupted provisioning"):
        Datasite._provision("site-a", tmp_path / "site-a", None, None, {}, {}, "")
    result = CliRunner().invoke(app, ["demo", "--keep-sites", str(tmp_path)])
    assert result.exit_code == 2
    assert "interrupted provisioning" in result.output and str(leftover) in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["deleted", "emptied", "truncated", "garbage"])
def test_missing_or_damaged_store_is_refused_and_nothing_written(kept, tmp_path, damage,
                                                                 monkeypatch):
    from datasites.runtime.datasite import Datasite

    site = _copy(kept, tmp_path)
    store = site / "syft.db"
    raw = store.read_bytes()
    if damage == "deleted":
        store.unlink()
    elif damage == "emptied":
        store.write_bytes(b"")
    elif damage == "truncated":
        store.write_bytes(raw[: len(raw) // 2 + 7])
    else:
        store.write_bytes(b"not a database" * 400)
    before = _digests(site)
    with pytest.raises(SiteDirectoryError, match="syft.db is (missing|damaged)"):
        Datasite.open(site, "owner@site-a.site", OWNER_PW)
    assert _digests(site) == before
    monkeypatch.setenv("FEDSYFT_OWNER_PASSWORD", OWNER_PW)
    result = CliRunner().invoke(app, ["requests", "list", "--site", str(site)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(store) in lines[0] and "password" not in lines[0]
    assert _digests(site) == before


@pytest.mark.parametrize("args, words", [
    (["--epsilon", "50"], "--epsilon: 50.0 is out of range"),  # the default policy's budget
    (["--rounds", "500"], "--rounds: 500 is out of range (allowed: 1 to 100)"),
    (["--seed", str(2**64)], "--seed"),
    (["--huge"], "too large"),
])
def test_demo_refuses_before_provisioning(shuttle_small, tmp_path, args, words):
    """Item 3: the job is checked against the table and the policy before any site exists."""
    table = shuttle_small.head(600).copy()
    if args == ["--huge"]:
        table["f2"] = table["f2"].astype(float)
        table.loc[::10, "f2"] = 1e30  # in every split
        args = []
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    keep = tmp_path / "sites"
    result = CliRunner().invoke(app, ["demo", "--data", str(path), "--sites", "2",
                                      "--keep-sites", str(keep), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output.strip().splitlines()[-1]
    assert not keep.exists() or not any(keep.iterdir())
