"""What a site keeps beside syft in its directory, readable without syft.

Why: a site must be reopened after a restart (``Datasite.open``), and its compliance officer
and the ``fedsyft audit`` commands work from the directory alone. No password is stored
here except the officer's, as a salted scrypt hash (the officer is not a syft user).

Files: ``site.json`` (site name, account emails by role, versions), ``officer.json`` (the
officer's email and scrypt hash, mode 0600), ``site.lock`` (held while the site is open).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SITE_FILE = "site.json"
OFFICER_FILE = "officer.json"
LOCK_FILE = "site.lock"
SITE_FORMAT = "fedsyft-site/1"
OFFICER_FORMAT = "fedsyft-officer/1"
# scrypt at n=2**14, r=8: ~16 MiB and ~50 ms per check, salted, so a copied officer.json
# costs a guesser real work per password
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


class SiteDirectoryError(ValueError):
    """Not a fedsyft site directory, or its files are unreadable."""


class SiteBusyError(RuntimeError):
    """The site is already open (in this or another process)."""


@dataclass(frozen=True)
class SiteInfo:
    """Public facts about a provisioned site (no secrets)."""

    name: str
    directory: Path
    accounts: dict[str, str]  # accounts.Role value -> email
    created: str
    syft_version: str

    def email(self, role: str) -> str:
        try:
            return self.accounts[role]
        except KeyError:
            raise SiteDirectoryError(f"site {self.name!r} has no {role} account on record "
                                     f"in {self.directory / SITE_FILE}") from None


def _atomic_write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", closefd=False) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_site_info(directory: Path, name: str, accounts: dict[str, str],
                    syft_version: str) -> SiteInfo:
    created = datetime.now(UTC).isoformat(timespec="seconds")
    doc = {"format": SITE_FORMAT, "name": name, "accounts": dict(accounts),
           "created": created, "syft_version": syft_version}
    _atomic_write(Path(directory) / SITE_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n",
                  0o644)
    return SiteInfo(name, Path(directory), dict(accounts), created, syft_version)


def read_site_info(directory: str | Path) -> SiteInfo:
    """The site's public facts, or :class:`SiteDirectoryError` naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SiteDirectoryError(f"site directory {directory} does not exist")
    path = directory / SITE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SiteDirectoryError(f"{directory} is not a fedsyft site directory "
                                 f"(no {SITE_FILE})") from None
    except (OSError, ValueError) as exc:
        raise SiteDirectoryError(f"{path} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != SITE_FORMAT or not isinstance(
            doc.get("name"), str) or not isinstance(doc.get("accounts"), dict):
        raise SiteDirectoryError(f"{path} is not a {SITE_FORMAT} file")
    return SiteInfo(doc["name"], directory, {str(k): str(v) for k, v in doc["accounts"].items()},
                    str(doc.get("created", "")), str(doc.get("syft_version", "")))


# ---- the compliance officer's credentials --------------------------------------------------
def _scrypt(password: str, salt: bytes, params: dict[str, int]) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=params["n"], r=params["r"],
                          p=params["p"], dklen=params["dklen"], maxmem=64 * 1024 * 1024)


def store_officer(directory: Path, email: str, password: str) -> None:
    """Keep the officer's email and a salted scrypt hash of the password (mode 0600)."""
    if len(password) < 8:
        raise ValueError("the compliance officer's password must have at least 8 characters")
    salt = secrets.token_bytes(16)
    doc = {"format": OFFICER_FORMAT, "email": email, "kdf": "scrypt", **SCRYPT,
           "salt": base64.b64encode(salt).decode(),
           "hash": base64.b64encode(_scrypt(password, salt, SCRYPT)).decode()}
    _atomic_write(Path(directory) / OFFICER_FILE, json.dumps(doc, indent=1) + "\n", 0o600)


def officer_email(directory: Path) -> str:
    return str(_officer_record(directory)["email"])


def _officer_record(directory: Path) -> dict[str, Any]:
    path = Path(directory) / OFFICER_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SiteDirectoryError(f"{directory} has no compliance officer ({OFFICER_FILE} "
                                 "missing)") from None
    except (OSError, ValueError) as exc:
        raise SiteDirectoryError(f"{path} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != OFFICER_FORMAT or doc.get(
            "kdf") != "scrypt":
        raise SiteDirectoryError(f"{path} is not a {OFFICER_FORMAT} file")
    return doc


def check_officer(directory: Path, email: str, password: str) -> bool:
    """True only for the officer's email and password (the hash is compared in constant time)."""
    doc = _officer_record(directory)
    try:
        salt = base64.b64decode(doc["salt"], validate=True)
        expected = base64.b64decode(doc["hash"], validate=True)
        params = {k: int(doc[k]) for k in ("n", "r", "p", "dklen")}
    except (KeyError, ValueError, TypeError) as exc:
        raise SiteDirectoryError(f"{Path(directory) / OFFICER_FILE} is corrupt: {exc}") from None
    got = _scrypt(password, salt, params)  # computed even for a wrong email: same timing
    return hmac.compare_digest(got, expected) and hmac.compare_digest(
        email.strip().lower().encode(), str(doc["email"]).strip().lower().encode())


# ---- one open site per directory ----------------------------------------------------------
class SiteLock:
    """An exclusive, non-blocking lock on the site directory while a site is open.

    flock locks belong to an open file description, so a second open in the same process is
    refused too; the lock goes away with the process if it dies.
    """

    def __init__(self, directory: Path, site: str) -> None:
        self._fd: int | None = os.open(Path(directory) / LOCK_FILE, os.O_RDWR | os.O_CREAT,
                                       0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise SiteBusyError(f"site {site!r} in {directory} is already open (a running "
                                "site holds it); stop it first") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
