"""Tamper-evident, append-only audit log kept by each datasite.

Why: syft 0.9.5 records neither who approved a request nor when, so every institution keeps
its own log that an auditor can check offline with nothing but the site's public key.
This module must not import syft (stdlib + cryptography only).

Files in the site directory:

- ``audit.jsonl``     one JSON entry per line; entry N carries ``prev_hash`` = hash of entry N-1
                      and ``hash`` = sha256 of its own canonical JSON (without ``hash``).
- ``audit.head.json`` the head (site, seq and hash of the last entry, count), Ed25519-signed.
- ``audit_key.pem``   the site's private signing key (mode 0600, never leaves the site).
- ``audit_key.pub``   the matching public key, to hand to auditors.
- ``audit.lock``      fcntl lock file: writers take it exclusively, `verify` takes it shared.

Write-ahead rule: callers MUST call `AuditLog.append` BEFORE the effect of the action becomes
visible (before an approval is stored, a result is handed out, a budget is debited...). If
`append` raises, the action must not happen. Then every visible effect has an entry, even when
the site crashes right after it.

What is detected: the hash chain reveals edited, deleted, inserted and reordered entries; the
signed head reveals a deleted tail and a rewritten chain. Limit: whoever can read
``audit_key.pem`` can rewrite the whole log and re-sign the head. Auditors should therefore pin
``audit_key.pub`` out of band (pass it to `verify`) and keep copies of heads they have seen
(`AuditLog.head`; every released reply carries one, see :mod:`datasites.governance.receipts`), so
a later
rewrite of an already-seen prefix is noticed. Readers use `AuditView`, which needs only the
public key: only the site service (`AuditLog`) ever opens the signing key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "ACTIONS",
    "ENTRY_FIELDS",
    "GENESIS_HASH",
    "ROLES",
    "Action",
    "AuditEntryError",
    "AuditError",
    "AuditKeyError",
    "AuditLog",
    "AuditLogCorrupt",
    "AuditView",
    "ChainState",
    "Role",
    "VerifyReport",
    "canonical_json",
    "entry_hash",
    "head_problem",
    "head_signature_valid",
    "key_id",
    "load_entries",
    "load_public_key",
    "scan_chain",
    "verify",
]

LOG_NAME = "audit.jsonl"
HEAD_NAME = "audit.head.json"
KEY_NAME = "audit_key.pem"
PUB_NAME = "audit_key.pub"
LOCK_NAME = "audit.lock"

GENESIS_HASH = "0" * 64
"""``prev_hash`` of entry 0."""
HEAD_FORMAT = "fedsyft-audit-head/1"
ENTRY_FIELDS = (
    "seq", "time", "site", "actor", "role", "action",
    "objects", "code_hash", "params", "prev_hash", "hash",
)  # fmt: skip


class Role(StrEnum):
    """Who acted. ``system`` is the site software itself; ``key_authority`` manages keys."""

    DATA_OWNER = "data_owner"
    DATA_SCIENTIST = "data_scientist"
    COMPLIANCE_OFFICER = "compliance_officer"
    SYSTEM = "system"
    KEY_AUTHORITY = "key_authority"


class Action(StrEnum):
    """What happened. Conventional ``objects`` / ``params`` keys (read by `audit_report`):

    - site_provisioned    params: {"syft_version", ...}
    - user_registered     objects: {"user_id"}; params: {"email", "role"}
    - user_removed        objects: {"user_id"}; params: {"reason"}
    - user_changed        objects: {"user_id"}; params: {"field", "old", "new", "actor_id",
                          "seen_in"} (a syft account's e-mail, key or role changed; the
                          site noticed it in syft's user list or in a request)
    - login_failed        actor = the email that was tried; params: {"reason"}
    - dataset_published   objects: {"dataset_id"}; params: {"name", "rows", "sha256"}
    - dataset_removed     objects: {"dataset_id"}; params: {"reason"}
    - request_submitted   objects: {"request_id", "code_id", "dataset_id"}; code_hash;
                          params: {"purpose"}
    - request_approved    objects: {"request_id"}; code_hash; params: {"reason"}
    - request_denied      objects: {"request_id"}; params: {"reason"}
    - request_overridden  objects: {"request_id"}; params: {"decision": "approved"|"denied",
                          "reason"}  (a compliance officer replacing an earlier decision)
    - request_withdrawn   objects: {"request_id"}
    - function_executed   objects: {"request_id", "code_id", "job_id"}; code_hash
    - result_released     objects: {"request_id", "result_id"};
                          params: {"sha256" (of the bytes that left the site), "bytes",
                          "recipient"}
    - result_withheld     objects: {"request_id"}; params: {"reason"}
    - budget_charged      objects: {"request_id"}; params: {"dataset", "epsilon", "delta"}
    - policy_changed      params: {"policy", "old", "new"}
    - call_refused        params: {"call", "reason"}
    - key_issued          objects: {"key_id"}; params: {"purpose"}
    - key_revoked         objects: {"key_id"}; params: {"reason"}
    - audit_exported      params: {"format", "entries", "bytes", "sha256"} (after the file
                          was written; "entries": how many the log held before this one;
                          format "copy", with "purpose": the log sent to an officer's
                          ``audit ... --config`` over HTTP)
    - audit_recovered     written by `AuditLog` when it re-signs an unsigned tail after a crash
    - file_modes_repaired params: {"changed": {path: former mode (octal string)}} (a site found
                          its directory or files open to others and made them owner-only)
    - site_state_rebuilt  params: {"files", "problems", "ledger", "policies"} (the data owner
                          rebuilt privacy_ledger.json / policy.json from this log, see
                          `datasites.governance.ledger_check`)
    - server_started      params: {"url", "pid", "previous_stop": "first" | "clean" |
                          "unclean" (the last server process died without stopping, e.g. a
                          kill -9 or a power cut)} (a hosted site, `fedsyft up`)
    - server_stopped      params: {"url", "pid"} (a clean stop, `fedsyft down`)
    """

    SITE_PROVISIONED = "site_provisioned"
    USER_REGISTERED = "user_registered"
    USER_REMOVED = "user_removed"
    USER_CHANGED = "user_changed"
    LOGIN_FAILED = "login_failed"
    DATASET_PUBLISHED = "dataset_published"
    DATASET_REMOVED = "dataset_removed"
    REQUEST_SUBMITTED = "request_submitted"
    REQUEST_APPROVED = "request_approved"
    REQUEST_DENIED = "request_denied"
    REQUEST_OVERRIDDEN = "request_overridden"
    REQUEST_WITHDRAWN = "request_withdrawn"
    FUNCTION_EXECUTED = "function_executed"
    RESULT_RELEASED = "result_released"
    RESULT_WITHHELD = "result_withheld"
    BUDGET_CHARGED = "budget_charged"
    POLICY_CHANGED = "policy_changed"
    CALL_REFUSED = "call_refused"
    KEY_ISSUED = "key_issued"
    KEY_REVOKED = "key_revoked"
    AUDIT_EXPORTED = "audit_exported"
    AUDIT_RECOVERED = "audit_recovered"
    FILE_MODES_REPAIRED = "file_modes_repaired"
    SITE_STATE_REBUILT = "site_state_rebuilt"
    SERVER_STARTED = "server_started"
    SERVER_STOPPED = "server_stopped"


ROLES: frozenset[str] = frozenset(r.value for r in Role)
ACTIONS: frozenset[str] = frozenset(a.value for a in Action)


class AuditError(ValueError):
    """Base class of audit-log errors."""


class AuditEntryError(AuditError):
    """An `append` call with an invalid actor, role, action, objects or params."""


class AuditKeyError(AuditError):
    """The site's signing key is missing, unreadable, too exposed or does not match."""


class AuditLogCorrupt(AuditError):
    """The log on disk is broken; appending would extend a corrupted chain."""

    def __init__(self, message: str, report: VerifyReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class VerifyReport:
    """Result of `verify`.

    ``entries`` is the number of lines in ``audit.jsonl``. When ``ok`` is false, entries
    ``0 .. first_bad_seq - 1`` form an intact chain and ``problem`` says where and how it
    breaks; ``first_bad_seq`` is None when no entry can be blamed (bad or missing head,
    rewritten chain). ``problem`` is "" when ``ok``.
    """

    ok: bool
    entries: int
    first_bad_seq: int | None
    problem: str


# ----------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN: the exact bytes that get hashed."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 (hex) over the canonical JSON of every field except ``hash``."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def _head_payload(head: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in head.items() if k != "signature"}).encode("ascii")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------- keys


def _key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short id of a site key, as written in every signed head (``key_id``)."""
    return _key_id(public_key)


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(key: Ed25519PublicKey | bytes | str | Path) -> Ed25519PublicKey:
    """Accept a key object, PEM bytes/text, 32 raw bytes or a path to a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Path) or (isinstance(key, str) and not key.startswith("-----BEGIN")):
        try:
            key = Path(key).read_bytes()
        except OSError as e:
            raise AuditKeyError(f"cannot read public key file {key}: {e}") from e
    if isinstance(key, str):
        key = key.encode("ascii")
    if not isinstance(key, bytes):
        raise AuditKeyError(f"unsupported public key type {type(key).__name__}")
    try:
        if len(key) == 32:
            return Ed25519PublicKey.from_public_bytes(key)
        loaded = serialization.load_pem_public_key(key)
    except ValueError as e:
        raise AuditKeyError(f"not a valid Ed25519 public key: {e}") from e
    if not isinstance(loaded, Ed25519PublicKey):
        raise AuditKeyError(f"audit keys are Ed25519, got {type(loaded).__name__}")
    return loaded


# ----------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write to a temp file, fsync, rename over ``path``: readers see old or new, never half.

    Owner-only by default, whatever the umask (the fchmod also fixes a stale temp file's
    mode): the site directory is 0700 and its files 0600. The public key and head need no
    wider mode: the officer's tools run as the site's user and read them inside the site
    directory; an auditor elsewhere gets a copy.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _shared_lock(directory: Path) -> Iterator[None]:
    """Shared lock for readers so they never see an entry whose head is not written yet.

    Best effort: a read-only copy handed to an auditor has no lock file and needs none.
    """
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- checking


def head_problem(head: Any) -> str:
    """"" if ``head`` has the shape of a signed head (as in the head file or a receipt)."""
    types = {"site": str, "seq": int, "hash": str, "count": int, "signature": str}
    if not isinstance(head, dict):
        return "not a JSON object"
    for field, typ in types.items():
        if type(head.get(field)) is not typ:
            return f"field {field!r} missing or not {typ.__name__}"
    if head["count"] < 0 or head["seq"] != head["count"] - 1:
        return f"seq {head['seq']} and count {head['count']}"
    return ""


def _read_head(path: Path) -> tuple[dict[str, Any] | None, str]:
    """Parse the head file; returns (head, "") or (None, problem)."""
    try:
        head = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, f"{HEAD_NAME} is missing: the end of the log cannot be checked"
    except (OSError, ValueError) as e:
        return None, f"{HEAD_NAME} is corrupt (not JSON: {e})"
    problem = head_problem(head)
    if problem:
        return None, f"{HEAD_NAME} is corrupt ({problem})"
    return head, ""


def head_signature_valid(head: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """Whether ``head`` (head file or receipt) was signed by the holder of ``public_key``."""
    return _head_signature_ok(head, public_key)


def _head_signature_ok(head: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    try:
        signature = base64.b64decode(head["signature"], validate=True)
        public_key.verify(signature, _head_payload(head))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _missing(first: int, last: int) -> str:
    return f"entry {first} is" if first == last else f"entries {first}..{last} are"


def _check_line(
    raw: bytes,
    i: int,
    prev_hash: str,
    site: str | None,
    hash_of: Callable[[int], str | None],
) -> tuple[dict[str, Any] | None, str, int]:
    """Check line ``i`` (0-based, so it should hold entry ``i``) against its predecessor.

    Returns (entry, "", -1) when it chains on, else (None, problem, first_bad_seq).
    """
    line_no = i + 1
    if not raw.endswith(b"\n"):
        return None, (
            f"line {line_no} is incomplete: the log ends without a newline "
            "(torn write at the end of the log)"
        ), i
    try:
        obj = json.loads(raw[:-1], parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return None, (
            f"line {line_no} is not valid JSON (corrupt entry where entry {i} was expected)"
        ), i
    if not isinstance(obj, dict):
        return None, f"line {line_no} is not a JSON object (corrupt entry {i})", i
    missing = [k for k in ENTRY_FIELDS if k not in obj]
    extra = sorted(set(obj) - set(ENTRY_FIELDS))
    if missing or extra:
        detail = f"missing {missing}" if missing else f"unexpected fields {extra}"
        return None, f"line {line_no} is not an audit entry ({detail})", i
    seq = obj["seq"]
    if type(seq) is not int or not isinstance(obj["hash"], str):
        return None, f"line {line_no} is not an audit entry (seq or hash has the wrong type)", i
    label = f"entry {i}" if seq == i else f"line {line_no} (claims to be entry {seq})"
    try:
        recomputed = entry_hash(obj)
    except ValueError:
        recomputed = ""
    if recomputed != obj["hash"]:
        return None, f"{label} was modified: its hash does not match its content", i
    if seq > i:
        if i == 0:
            return None, f"the log starts at entry {seq}: {_missing(0, seq - 1)} missing", 0
        return None, (
            f"entry {seq} does not follow entry {i - 1}: {_missing(i, seq - 1)} missing "
            "(deleted or reordered entry)"
        ), i
    if seq < i:
        if seq >= 0 and obj["hash"] == hash_of(seq):
            return None, (
                f"entry {seq} appears again on line {line_no} after entry {i - 1} "
                "(duplicated or replayed entry)"
            ), i
        if seq >= 0 and obj["prev_hash"] == (GENESIS_HASH if seq == 0 else hash_of(seq - 1)):
            return None, (
                f"line {line_no} holds a second entry {seq} that also follows entry {seq - 1}: "
                f"the chain forks at entry {seq} (an entry was inserted)"
            ), seq
        return None, (
            f"entry {seq} appears after entry {i - 1}: seq goes backwards "
            "(inserted or reordered entry)"
        ), i
    if obj["prev_hash"] != prev_hash:
        if i == 0:
            return None, (
                "entry 0 does not start the chain: its prev_hash is not the genesis hash "
                "(earlier entries deleted?)"
            ), 0
        return None, (
            f"entry {i} does not follow entry {i - 1}: prev_hash mismatch "
            "(deleted, inserted or reordered entry)"
        ), i
    if site is not None and obj["site"] != site:
        return None, f"entry {i} belongs to site {obj['site']!r}, not {site!r}", i
    return obj, "", -1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _HashList:
    """Hashes of the intact prefix, 32 bytes each, to name forks and replays precisely."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def add(self, hex_hash: str) -> None:
        self._buf += bytes.fromhex(hex_hash)

    def __call__(self, seq: int) -> str | None:
        if 0 <= seq and (seq + 1) * 32 <= len(self._buf):
            return self._buf[seq * 32 : (seq + 1) * 32].hex()
        return None


@dataclass
class _Scan:
    """Everything `verify` learns; `AuditLog` also uses it to resume or recover."""

    report: VerifyReport
    head: dict[str, Any] | None
    head_signed: bool  # the head's signature is valid for the key used
    good: int  # entries 0..good-1 form an intact chain
    good_end: int  # byte offset just after entry good-1
    last_hash: str  # hash of entry good-1 (GENESIS_HASH when good == 0)
    torn_tail: bool  # the first bad line is an unterminated last line
    hashes: _HashList


def _fail(entries: int, first_bad: int | None, problem: str) -> VerifyReport:
    return VerifyReport(ok=False, entries=entries, first_bad_seq=first_bad, problem=problem)


def _scan(directory: Path, public_key: Ed25519PublicKey | None) -> _Scan:
    head, head_problem = _read_head(directory / HEAD_NAME)
    head_signed = bool(head and public_key and _head_signature_ok(head, public_key))
    site = head["site"] if head and head_signed else None  # else trust entry 0's site
    hashes = _HashList()
    n = good = good_end = 0
    last_hash = GENESIS_HASH
    problem, first_bad, torn = "", None, False
    try:
        f = open(directory / LOG_NAME, "rb")
    except FileNotFoundError:
        report = _fail(0, None, f"no audit log: {directory / LOG_NAME} does not exist")
        return _Scan(report, head, head_signed, 0, 0, GENESIS_HASH, False, hashes)
    with f:
        offset = 0
        for raw in f:
            offset += len(raw)
            n += 1
            if problem:
                continue
            entry, problem, bad = _check_line(raw, n - 1, last_hash, site, hashes)
            if entry is None:
                first_bad, torn = bad, not raw.endswith(b"\n")
                continue
            site = site or entry["site"]
            last_hash = entry["hash"]
            hashes.add(last_hash)
            good, good_end = n, offset
    scan = _Scan(_fail(n, first_bad, problem), head, head_signed, good, good_end, last_hash,
                 torn, hashes)
    if problem:
        return scan
    if head is None:
        scan.report = _fail(n, None, head_problem)
    elif public_key is None:
        scan.report = _fail(n, None, f"no public key given and {PUB_NAME} is missing or invalid")
    elif not head_signed:
        scan.report = _fail(n, None, (
            f"the head's signature is not valid for the site's public key {_key_id(public_key)} "
            "(head forged or re-signed with another key)"
        ))
    elif head["count"] > n:
        last = f"ends at entry {n - 1}" if n else "is empty"
        scan.report = _fail(n, n, (
            f"log {last} but the signed head says {head['count']} entries (tail deleted)"
        ))
    elif head["count"] > 0 and hashes(head["count"] - 1) != head["hash"]:
        scan.report = _fail(n, None, (
            f"entry {head['count'] - 1} does not match the signed head's hash "
            "(log rewritten after it was signed)"
        ))
    elif head["count"] < n:
        scan.report = _fail(n, head["count"], (
            f"log has {n} entries but the signed head covers only {head['count']}: "
            f"{_missing(head['count'], n - 1)} not covered by the signature "
            "(appended without the site key, or a crash between writing the entry and the head)"
        ))
    else:
        scan.report = VerifyReport(ok=True, entries=n, first_bad_seq=None, problem="")
    return scan


def verify(
    directory: Path | str, public_key: Ed25519PublicKey | bytes | str | Path | None = None
) -> VerifyReport:
    """Check the whole chain and the signed head of the log in ``directory``.

    Pass the site's public key obtained out of band; without it ``audit_key.pub`` next to the
    log is used, which does not catch someone who replaced both the key and the head.
    """
    return scan_chain(directory, public_key).report


def _resolve_key(
    directory: Path, public_key: Ed25519PublicKey | bytes | str | Path | None
) -> Ed25519PublicKey | None:
    """The pinned key if given (errors raise), else ``audit_key.pub`` (None if unusable)."""
    if public_key is not None:
        return load_public_key(public_key)
    try:
        return load_public_key(directory / PUB_NAME)
    except AuditKeyError:
        return None


@dataclass(frozen=True)
class ChainState:
    """What a full check of the log establishes, for checks built on top (receipts).

    ``hash_at(seq)`` is the hash of entry ``seq`` if it lies in the intact prefix of the
    chain, else None; ``public_key`` is the key the head was checked with.
    """

    report: VerifyReport
    public_key: Ed25519PublicKey | None
    head: dict[str, Any] | None
    hash_at: Callable[[int], str | None]


def scan_chain(
    directory: Path | str, public_key: Ed25519PublicKey | bytes | str | Path | None = None
) -> ChainState:
    """`verify`, also returning the verified entry hashes and the key used (public only)."""
    directory = Path(directory)
    with _shared_lock(directory):
        key = _resolve_key(directory, public_key)
        scan = _scan(directory, key)
    return ChainState(scan.report, key, scan.head, scan.hashes)


def snapshot(directory: Path | str) -> dict[str, bytes]:
    """The log, its signed head and public key as one consistent copy (read under the
    shared lock, so no entry without its head), for an officer to verify elsewhere."""
    directory = Path(directory)
    with _shared_lock(directory):
        return {name: (directory / name).read_bytes() for name in (LOG_NAME, HEAD_NAME, PUB_NAME)
                if (directory / name).is_file()}


class AuditView:
    """Read-only view of a site's log for whoever audits it: public key only.

    Why: the officer (or anyone else checking the site) must not need, and so must not
    be able to misuse, the site's signing key; unlike `AuditLog` this never opens
    ``audit_key.pem``, never creates a file and takes only the shared read lock.
    ``public_key`` is the key pinned out of band; None means ``audit_key.pub`` next to the
    log, read afresh by each check.
    """

    def __init__(
        self,
        directory: Path | str,
        public_key: Ed25519PublicKey | bytes | str | Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._public_key = public_key

    def verify(self) -> VerifyReport:
        """Full check of the hash chain and the signed head."""
        return verify(self.directory, self._public_key)

    def chain(self) -> ChainState:
        """Like `verify`, with the verified hashes (see `ChainState`)."""
        return scan_chain(self.directory, self._public_key)

    def entries(
        self,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        action: str | Iterable[str] | None = None,
        actor: str | None = None,
    ) -> list[dict[str, Any]]:
        """Entries (not verified; lines that are not JSON objects are skipped)."""
        return load_entries(self.directory, since=since, until=until, action=action,
                            actor=actor, strict=False)

    def head(self) -> dict[str, Any]:
        """The head file as it is now (check it with `verify`)."""
        head, problem = _read_head(self.directory / HEAD_NAME)
        if head is None:
            raise AuditLogCorrupt(f"{self.directory}: {problem}")
        return head


# ----------------------------------------------------------------------------- reading


def _parse_time(value: datetime | str, what: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as e:
            raise AuditError(f"{what} {value!r} is not an ISO-8601 time") from e
    if value.tzinfo is None:
        raise AuditError(f"{what} {value.isoformat()} has no timezone; audit times are UTC")
    return value


def load_entries(
    directory: Path | str,
    *,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    action: str | Iterable[str] | None = None,
    actor: str | None = None,
    strict: bool = True,
) -> list[dict[str, Any]]:
    """Entries with ``since <= time < until``, matching action(s) and actor (exact match).

    Does not verify the chain (call `verify` for that). ``strict=False`` skips lines that are
    not JSON objects instead of raising `AuditLogCorrupt`, e.g. to report on a damaged log.
    """
    directory = Path(directory)
    lo = _parse_time(since, "since") if since is not None else None
    hi = _parse_time(until, "until") if until is not None else None
    actions = {action} if isinstance(action, str) else set(action) if action is not None else None
    out: list[dict[str, Any]] = []
    with _shared_lock(directory), open(directory / LOG_NAME, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if strict:
                    raise AuditLogCorrupt(f"{directory / LOG_NAME} line {line_no}: {e}") from e
                continue
            if actions is not None and entry.get("action") not in actions:
                continue
            if actor is not None and entry.get("actor") != actor:
                continue
            if lo is not None or hi is not None:
                t = _parse_time(str(entry.get("time")), f"time of entry {entry.get('seq')}")
                if (lo is not None and t < lo) or (hi is not None and t >= hi):
                    continue
            out.append(entry)
    return out


# ----------------------------------------------------------------------------- writing

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _json_safe(value: Mapping[str, Any] | None, what: str, action: str) -> dict[str, Any]:
    """Round-trip through canonical JSON so the entry returned is exactly what gets hashed."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AuditEntryError(f"{what} for {action} must be a dict, got {type(value).__name__}")
    bad_keys = [k for k in value if not isinstance(k, str)]
    if bad_keys:
        raise AuditEntryError(f"{what} for {action} has non-string keys {bad_keys!r}")
    try:
        return json.loads(canonical_json(dict(value)))
    except (TypeError, ValueError) as e:
        raise AuditEntryError(f"{what} for {action} is not JSON-safe: {e}") from e


def _validate(
    actor: str,
    role: str,
    action: str,
    objects: Mapping[str, Any] | None,
    code_hash: str | None,
    params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if not isinstance(role, str) or role not in ROLES:
        raise AuditEntryError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    if not isinstance(action, str) or action not in ACTIONS:
        raise AuditEntryError(f"unknown action {action!r}; expected one of {sorted(ACTIONS)}")
    if not isinstance(actor, str) or not actor or _CONTROL.search(actor) or len(actor) > 254:
        raise AuditEntryError(f"actor {actor!r} for {action} must be a non-empty printable string")
    if role != Role.SYSTEM and not _EMAIL.match(actor):
        raise AuditEntryError(f"actor {actor!r} for {action} ({role}) must be an email address")
    if code_hash is not None and (not isinstance(code_hash, str) or not code_hash
                                  or _CONTROL.search(code_hash)):
        raise AuditEntryError(f"code_hash {code_hash!r} for {action} must be a non-empty string")
    objs = _json_safe(objects, "objects", action)
    for key, val in objs.items():
        if not isinstance(val, str | int) or isinstance(val, bool):
            raise AuditEntryError(f"object id {key!r} for {action} must be a str or int")
    return {
        "actor": actor,
        "role": str(role),
        "action": str(action),
        "objects": objs,
        "code_hash": code_hash,
        "params": _json_safe(params, "params", action),
    }


class AuditLog:
    """Writer for one site's log. Safe to share between threads and between processes.

    Opening verifies the entire existing chain and the signed head (O(size of log)); a broken
    log raises `AuditLogCorrupt` instead of being extended. ``recover_unsigned_tail=True`` is
    the operator's explicit repair after a crash between writing an entry and re-signing the
    head: when the only problem is an unterminated last line and/or intact entries after the
    signed head, the torn line is cut off, the head is re-signed and an ``audit_recovered``
    entry records what was accepted.

    Each append re-checks only that the file was not shrunk or replaced and verifies entries
    other writers added since (cheap); run `verify` for a full check at any time. After
    ``os.fork`` open a new AuditLog in the child: the inherited lock descriptor is shared.
    """

    def __init__(
        self, directory: Path | str, site: str, *, recover_unsigned_tail: bool = False
    ) -> None:
        if not isinstance(site, str) or not site or _CONTROL.search(site) or len(site) > 200:
            raise AuditError(f"site name {site!r} must be a non-empty printable string")
        self.directory = Path(directory)
        self.site = site
        self._lock = threading.Lock()
        self._log_fd: int | None = None
        self._broken = ""
        self._count = 0
        self._last_hash = GENESIS_HASH
        self._size = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = os.open(
            self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            os.fchmod(self._lock_fd, 0o600)  # exact, whatever the umask or an older file's mode
            with self._exclusive():
                self._key = self._load_or_create_key()
                self.public_key: Ed25519PublicKey = self._key.public_key()
                self._open_chain(recover_unsigned_tail)
        except BaseException:
            self.close()
            raise

    # -- public -----------------------------------------------------------------------

    def append(
        self,
        actor: str,
        role: Role | str,
        action: Action | str,
        *,
        objects: Mapping[str, str | int] | None = None,
        code_hash: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Durably record an action and return the entry as written.

        Call this BEFORE the action's effect becomes visible; if it raises, do not perform
        the action. Returns only after the entry is fsynced and the new head is signed.
        """
        fields = _validate(actor, role, action, objects, code_hash, params)
        with self._lock, self._exclusive():
            return self._append_locked(fields)

    def entries(
        self,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        action: str | Iterable[str] | None = None,
        actor: str | None = None,
    ) -> list[dict[str, Any]]:
        """Entries with ``since <= time < until``, matching action(s) and actor."""
        return load_entries(self.directory, since=since, until=until, action=action, actor=actor)

    def head(self) -> dict[str, Any]:
        """The current signed head; auditors keep copies to detect later rewrites."""
        head, problem = _read_head(self.directory / HEAD_NAME)
        if head is None:
            raise AuditLogCorrupt(f"site {self.site!r}: {problem}")
        return head

    def verify(self) -> VerifyReport:
        """`verify` this log with the site's own public key."""
        return verify(self.directory, self.public_key)

    @property
    def count(self) -> int:
        """Number of entries this writer knows to be in the log."""
        return self._count

    def close(self) -> None:
        for name in ("_log_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if self._lock_fd is None:
            raise AuditError(f"audit log of site {self.site!r} is closed")
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _load_or_create_key(self) -> Ed25519PrivateKey:
        key_path, pub_path = self.directory / KEY_NAME, self.directory / PUB_NAME
        if not key_path.exists():
            log_path, head_path = self.directory / LOG_NAME, self.directory / HEAD_NAME
            if head_path.exists() or (log_path.exists() and log_path.stat().st_size > 0):
                raise AuditKeyError(
                    f"site {self.site!r}: {key_path} is missing but an audit log exists; "
                    "cannot resume the chain without the site's signing key"
                )
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)
                _write_all(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            _atomic_write(pub_path, _public_pem(key.public_key()))
            return key
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise AuditKeyError(
                f"site {self.site!r}: {key_path} is accessible to group/others "
                f"(mode {mode:o}); run chmod 600 on it"
            )
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise AuditKeyError(f"site {self.site!r}: cannot load {key_path}: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditKeyError(f"site {self.site!r}: {key_path} is not an Ed25519 key")
        pub_pem = _public_pem(key.public_key())
        if not pub_path.exists():
            _atomic_write(pub_path, pub_pem)
        elif load_public_key(pub_path) != key.public_key():
            raise AuditKeyError(f"site {self.site!r}: {pub_path} does not match {key_path}")
        return key

    def _open_chain(self, recover: bool) -> None:
        log_path, head_path = self.directory / LOG_NAME, self.directory / HEAD_NAME
        fresh = not head_path.exists() and (
            not log_path.exists() or log_path.stat().st_size == 0
        )
        if fresh:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)  # holds emails
            os.fchmod(fd, 0o600)
            os.close(fd)
            _fsync_dir(self.directory)
            self._write_head()
        scan = _scan(self.directory, self.public_key)
        if scan.head is not None and scan.head["site"] != self.site:
            raise AuditError(
                f"{self.directory} holds the audit log of site {scan.head['site']!r}, "
                f"not {self.site!r}"
            )
        if not scan.report.ok and not (recover and self._recoverable(scan)):
            hint = (" (if the site crashed, its data owner can sign the tail with `fedsyft "
                    "site repair --site DIR`)") if self._recoverable(scan) else ""
            raise AuditLogCorrupt(
                f"refusing to append to the audit log of site {self.site!r} in "
                f"{self.directory}: {scan.report.problem}{hint}",
                scan.report,
            )
        if scan.torn_tail:
            with open(log_path, "r+b") as f:
                torn_bytes = f.seek(0, os.SEEK_END) - scan.good_end
                f.truncate(scan.good_end)
                os.fsync(f.fileno())
        else:
            torn_bytes = 0
        self._count, self._last_hash, self._size = scan.good, scan.last_hash, scan.good_end
        self._log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
        if not scan.report.ok:
            assert scan.head is not None
            self._write_head()
            self._append_locked(_validate("system", Role.SYSTEM, Action.AUDIT_RECOVERED, None,
                                          None, {
                "signed_entries": scan.head["count"],
                "unsigned_entries": scan.good - scan.head["count"],
                "torn_bytes": torn_bytes,
                "problem": scan.report.problem,
            }))

    @staticmethod
    def _recoverable(scan: _Scan) -> bool:
        """Only a crash-shaped problem: intact chain, valid head covering a prefix of it."""
        head = scan.head
        complete_lines = scan.report.entries - (1 if scan.torn_tail else 0)
        return bool(
            head is not None
            and scan.head_signed
            and scan.good == complete_lines
            and head["count"] <= scan.good
            and (head["count"] == 0 or scan.hashes(head["count"] - 1) == head["hash"])
        )

    def _write_head(self) -> None:
        head: dict[str, Any] = {
            "format": HEAD_FORMAT,
            "site": self.site,
            "seq": self._count - 1,
            "hash": self._last_hash,
            "count": self._count,
            "time": _now(),
            "key_id": _key_id(self.public_key),
        }
        head["signature"] = base64.b64encode(self._key.sign(_head_payload(head))).decode()
        data = (json.dumps(head, indent=2, sort_keys=True) + "\n").encode("ascii")
        _atomic_write(self.directory / HEAD_NAME, data)

    def _append_locked(self, fields: dict[str, Any]) -> dict[str, Any]:
        self._ensure_current()
        assert self._log_fd is not None
        entry: dict[str, Any] = {
            "seq": self._count,
            "time": _now(),
            "site": self.site,
            **fields,
            "prev_hash": self._last_hash,
        }
        entry["hash"] = entry_hash(entry)
        line = (canonical_json(entry) + "\n").encode("ascii")
        try:
            _write_all(self._log_fd, line)
            os.fsync(self._log_fd)
        except OSError as e:
            try:  # undo a partial write so the chain stays intact
                os.ftruncate(self._log_fd, self._size)
                os.fsync(self._log_fd)
            except OSError:
                self._broken = f"writing entry {entry['seq']} failed ({e}) and could not be undone"
            raise
        self._count += 1
        self._last_hash = entry["hash"]
        self._size += len(line)
        try:
            self._write_head()
        except OSError as e:
            self._broken = (
                f"entry {entry['seq']} was written but signing the head failed ({e}); "
                "reopen with recover_unsigned_tail=True"
            )
            raise
        return json.loads(line)

    def _ensure_current(self) -> None:
        """Refuse if the log was damaged while open; pick up entries other writers added."""
        where = f"audit log of site {self.site!r} in {self.directory}"
        if self._broken:
            raise AuditLogCorrupt(f"refusing to append to the {where}: {self._broken}")
        assert self._log_fd is not None
        try:
            st = os.stat(self.directory / LOG_NAME)
        except FileNotFoundError:
            st = None
        mine = os.fstat(self._log_fd)
        if st is None or (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            self._broken = f"{LOG_NAME} was deleted or replaced while the site was running"
        elif st.st_size < self._size:
            self._broken = (
                f"{LOG_NAME} shrank from {self._size} to {st.st_size} bytes while the site was "
                "running (entries deleted)"
            )
        elif st.st_size > self._size:
            self._broken = self._catch_up()
        if self._broken:
            raise AuditLogCorrupt(f"refusing to append to the {where}: {self._broken}")

    def _catch_up(self) -> str:
        """Check entries appended by another writer since we last looked; "" if they chain on."""
        count, last_hash, size = self._count, self._last_hash, self._size
        with open(self.directory / LOG_NAME, "rb") as f:
            f.seek(size)
            for raw in f:
                entry, problem, _ = _check_line(raw, count, last_hash, self.site, lambda _: None)
                if entry is None:
                    return problem
                count, last_hash, size = count + 1, entry["hash"], size + len(raw)
        head, problem = _read_head(self.directory / HEAD_NAME)
        if head is None:
            return problem
        if not _head_signature_ok(head, self.public_key):
            return f"{HEAD_NAME} signature is not valid for this site's key"
        if head["count"] != count or head["hash"] != last_hash:
            return (
                f"{LOG_NAME} has {count} entries but the signed head covers {head['count']}; "
                "entries were added without the site key"
            )
        self._count, self._last_hash, self._size = count, last_hash, size
        return ""
