"""What a site keeps beside syft in its directory, readable without syft.

Why: a site must be reopened after a restart (``Datasite.open``), and its compliance officer
and the ``fedsyft audit`` commands work from the directory alone. No password is stored
here except the officer's, as a salted scrypt hash (the officer is not a syft user).

Files: ``site.json`` (site name, account emails by role, versions), ``officer.json`` (the
officer's email and scrypt hash), ``site.lock`` (held while the site is open).

File modes: the site directory is 0700 and every file in it 0600, whatever the process
umask, because syft's store (``syft.db``) holds the private table in clear and the other
files hold keys, approvals and emails. Writers create their files 0600 from the start
(:func:`open_private`, :func:`write_private`); :func:`secure_directory` sweeps the whole
tree at provisioning, open and close, for the files syft itself writes (its sqlite store
inherits 0600 from the file fedsyft pre-creates, but its blob store uses the umask).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SITE_FILE = "site.json"
OFFICER_FILE = "officer.json"
LOCK_FILE = "site.lock"
COMPLETE_FILE = "provisioned.json"  # written last, just before the site is moved into place
STORE_FILE = "syft.db"
STAGING_INFIX = ".provisioning-"  # DIR/.NAME.provisioning-<random>: a site being built
_SQLITE_MAGIC = b"SQLite format 3\x00"
SITE_FORMAT = "fedsyft-site/1"
OFFICER_FORMAT = "fedsyft-officer/1"
# scrypt at n=2**14, r=8: ~16 MiB and ~50 ms per check, salted, so a copied officer.json
# costs a guesser real work per password
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
DIR_MODE = 0o700  # the site directory and every directory under it
FILE_MODE = 0o600  # every file in it
MIN_PASSWORD_LENGTH = 8  # owners' and officers' passwords alike (see accounts.check_password)


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


# ---- owner-only files --------------------------------------------------------------------
def open_private(path: str | Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """``os.open`` a file that is 0600 from its creation on, whatever the umask.

    The fchmod matters for a file that already existed (``O_TRUNC`` keeps its old mode, e.g.
    a stale temporary file left 0644 by an older version) and makes the mode exact.
    """
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temp file, fsync, rename), mode 0600."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = open_private(tmp)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def make_private_directory(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) and make ``path`` itself 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)  # mkdir's mode is cut by the umask; an existing dir keeps its own
    return path


def secure_directory(path: str | Path, *, marker: str | None = SITE_FILE,
                     keep: frozenset[str] = frozenset()) -> dict[str, int]:
    """Make ``path`` and every directory under it 0700 and every file 0600; returns what it
    changed (path relative to ``path`` → former mode), so a caller can log the exposure.

    ``marker``: refuse (:class:`SiteDirectoryError`) unless that file is in ``path``, so a
    mistyped directory is never swept. ``keep``: top-level names left as they are (the
    audit signing key: a key others could read needs the operator's decision, not a silent
    repair; :class:`datasites.governance.audit.AuditLog` refuses it). Symbolic links are neither
    followed nor changed. Covers sqlite's ``-wal``/``-shm``/``-journal`` files and syft's
    blob store like any other file.
    """
    root = Path(path)
    try:
        names = os.listdir(root)  # needs only read permission, so works on a 0644 directory
    except FileNotFoundError:
        raise SiteDirectoryError(f"site directory {root} does not exist") from None
    except OSError as exc:
        raise SiteDirectoryError(f"site directory {root} is unreadable: {exc}") from None
    if marker is not None and marker not in names:
        raise SiteDirectoryError(f"{root} is not a fedsyft site directory (no {marker}); "
                                 "its file modes were left alone")
    changed: dict[str, int] = {}

    def fix(target: Path, want: int) -> None:
        try:
            st = os.lstat(target)
        except FileNotFoundError:  # removed meanwhile (a temporary file renamed away)
            return
        if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == want:
            return
        try:
            os.chmod(target, want)
        except FileNotFoundError:
            return
        changed[str(target.relative_to(root)) if target != root else "."] = stat.S_IMODE(
            st.st_mode)

    fix(root, DIR_MODE)  # first, so that nothing below is reachable by others meanwhile
    for here, dirs, files in os.walk(root):  # does not descend into symlinked directories
        base = Path(here)
        for name in dirs:
            fix(base / name, DIR_MODE)
        for name in files:
            if base == root and name in keep:
                continue
            fix(base / name, FILE_MODE)
    return changed


def write_site_info(directory: Path, name: str, accounts: dict[str, str],
                    syft_version: str) -> SiteInfo:
    created = datetime.now(UTC).isoformat(timespec="seconds")
    doc = {"format": SITE_FORMAT, "name": name, "accounts": dict(accounts),
           "created": created, "syft_version": syft_version}
    write_private(Path(directory) / SITE_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return SiteInfo(name, Path(directory), dict(accounts), created, syft_version)


def read_site_info(directory: str | Path) -> SiteInfo:
    """The site's public facts, or :class:`SiteDirectoryError` naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SiteDirectoryError(f"site directory {directory} does not exist")
    if is_staging(directory):
        raise SiteDirectoryError(f"{directory} is the temporary directory of an interrupted "
                                 "provisioning, not a site; remove it")
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
    if not (directory / COMPLETE_FILE).is_file():
        raise SiteDirectoryError(f"{directory} is a half-built site (no {COMPLETE_FILE}: its "
                                 "provisioning never finished); remove it and provision again")
    return SiteInfo(doc["name"], directory, {str(k): str(v) for k, v in doc["accounts"].items()},
                    str(doc.get("created", "")), str(doc.get("syft_version", "")))


# ---- all-or-nothing provisioning ---------------------------------------------------------
def staging_path(target: Path) -> Path:
    """Where ``target`` is built: beside it (same filesystem, so the final move is one atomic
    rename), hidden, and named so a leftover says what it was."""
    return target.parent / f".{target.name}{STAGING_INFIX}{secrets.token_hex(4)}"


def is_staging(path: Path) -> bool:
    return path.name.startswith(".") and STAGING_INFIX in path.name


def leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Temporary directories an interrupted provisioning left in ``parent`` (of site ``name``
    only, if given)."""
    prefix = f".{name}{STAGING_INFIX}" if name else "."
    try:
        return sorted(p for p in Path(parent).iterdir()
                      if p.name.startswith(prefix) and is_staging(p))
    except OSError:  # parent missing or unreadable: nothing of ours is there
        return []


def leftover_message(found: list[Path]) -> str:
    return (f"an interrupted provisioning left {', '.join(map(str, found))}; "
            f"remove {'it' if len(found) == 1 else 'them'}")


def mark_complete(directory: Path) -> None:
    """The completion marker: a site directory without it is refused (read_site_info)."""
    doc = {"format": SITE_FORMAT, "completed": datetime.now(UTC).isoformat(timespec="seconds")}
    write_private(Path(directory) / COMPLETE_FILE, json.dumps(doc) + "\n")


def check_store(directory: Path) -> None:
    """Refuse a missing or damaged syft store, reading only (nothing is created or written).

    Why: syft silently creates a fresh empty store where its file is missing or unreadable,
    and the next login then fails as "wrong email or password". Checked: the file exists,
    has sqlite's header, is as long as the header says, and passes ``PRAGMA quick_check``
    opened immutable (read-only, no ``-shm``; the main file is a consistent snapshot even
    while newer pages sit in the ``-wal`` file).
    """
    import sqlite3

    path = Path(directory) / STORE_FILE
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
        size = path.stat().st_size
    except FileNotFoundError:
        raise SiteDirectoryError(f"the site's store {path} is missing; restore it from a "
                                 "backup (a new empty store would lose the site)") from None
    except OSError as exc:
        raise SiteDirectoryError(f"the site's store {path} is unreadable: {exc}") from None
    damaged = f"the site's store {path} is damaged"
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise SiteDirectoryError(f"{damaged} (no sqlite header); restore it from a backup")
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(header[28:32], "big")
    if size % page or size < pages * page:
        raise SiteDirectoryError(f"{damaged} (truncated: {size} bytes, its header says "
                                 f"{pages * page}); restore it from a backup")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise SiteDirectoryError(f"{damaged} ({exc}); restore it from a backup") from None
    if verdict != "ok":
        raise SiteDirectoryError(f"{damaged} ({verdict}); restore it from a backup")


# ---- the compliance officer's credentials --------------------------------------------------
def _scrypt(password: str, salt: bytes, params: dict[str, int]) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=params["n"], r=params["r"],
                          p=params["p"], dklen=params["dklen"], maxmem=64 * 1024 * 1024)


def store_officer(directory: Path, email: str, password: str) -> None:
    """Keep the officer's email and a salted scrypt hash of the password (mode 0600)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError("the compliance officer's password must have at least "
                         f"{MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(16)
    doc = {"format": OFFICER_FORMAT, "email": email, "kdf": "scrypt", **SCRYPT,
           "salt": base64.b64encode(salt).decode(),
           "hash": base64.b64encode(_scrypt(password, salt, SCRYPT)).decode()}
    write_private(Path(directory) / OFFICER_FILE, json.dumps(doc, indent=1) + "\n")


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
        self._fd: int | None = open_private(Path(directory) / LOCK_FILE, os.O_RDWR)
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
