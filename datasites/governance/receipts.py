"""Receipts: signed audit heads kept by whoever received a site's replies.

Why: whoever holds ``audit_key.pem`` (the site's own staff) can rewrite the whole log and
re-sign its head, and plain `datasites.governance.audit.verify` then passes. Every reply an approved
call releases carries the site's signed head at that moment (``audit_head``, added by
:mod:`datasites.governance.call_audit`); the data scientist keeps them (one JSON line per reply,
:func:`append_receipt`). A receipt says "the log's entry ``seq`` had hash ``hash``", signed
with the site key, so once history before a receipt is changed the log no longer matches
it, whatever key re-signed the new head. :func:`check_receipts` is that comparison.

Not detected: entries after the last receipt (nobody has seen them yet), and anything at
a site that never released a reply to a receipt holder. No syft import here.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from datasites.governance.audit import (
    AuditError,
    ChainState,
    head_problem,
    head_signature_valid,
    key_id,
    scan_chain,
)

__all__ = ["PEER_RECEIPTS", "Receipt", "ReceiptCheck", "ReceiptFileError", "append_receipt",
           "check_receipts", "keep_peer_receipts", "load_receipts"]

#: where a site keeps the other members' signed heads that came with an aggregate
PEER_RECEIPTS = "peer_receipts.jsonl"

_WRITE_LOCK = threading.Lock()  # the trainer calls sites from several threads


class ReceiptFileError(AuditError):
    """The receipts file cannot be read or one of its lines is not a receipt."""


@dataclass(frozen=True)
class Receipt:
    """One line of a receipts file: a site's signed head as it came with one reply."""

    line: int  # 1-based line in the file, to name the receipt in messages
    site: str  # the site name the holder knew it by
    head: dict[str, Any]  # the signed head: site, seq, hash, count, key_id, signature...
    job_id: str = ""
    action: str = ""

    def describe(self) -> str:
        what = f", {self.job_id} {self.action}".rstrip() if self.job_id else ""
        return f"receipt on line {self.line} (site {self.site!r}, seq {self.head['seq']}{what})"


@dataclass(frozen=True)
class ReceiptCheck:
    """Result of :func:`check_receipts`: ``ok`` or the first receipt that fails, and why."""

    ok: bool
    site: str
    checked: int  # receipts of this site that were compared
    latest_seq: int  # highest seq attested by a matching receipt (-1 if none)
    problem: str = ""
    receipt: Receipt | None = None


def append_receipt(path: Path | str, site: str, head: Mapping[str, Any], *, job_id: str = "",
                   action: str = "") -> None:
    """Append one receipt line (the holder's own record; mode 0600 on creation)."""
    record = {"site": site, "job_id": job_id, "action": action, "audit_head": dict(head),
              "received": datetime.now(UTC).isoformat(timespec="seconds")}
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
    path = Path(path)
    with _WRITE_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def load_receipts(path: Path | str) -> list[Receipt]:
    """Every receipt in a JSON-lines file; any malformed line raises `ReceiptFileError`."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ReceiptFileError(f"cannot read receipts file {path}: {e.strerror or e}") from e
    out: list[Receipt] = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            raise ReceiptFileError(f"receipts file {path} line {n} is not valid JSON") from None
        head = obj.get("audit_head") if isinstance(obj, dict) else None
        problem = "no audit_head object" if not isinstance(head, dict) else head_problem(head)
        site = obj.get("site") if isinstance(obj, dict) else None
        if not problem and not isinstance(site, str):
            problem = "field 'site' missing or not a string"
        if problem:
            raise ReceiptFileError(f"receipts file {path} line {n} is not a receipt ({problem})")
        out.append(Receipt(n, site, head, str(obj.get("job_id") or ""),
                           str(obj.get("action") or "")))
    if not out:
        raise ReceiptFileError(f"receipts file {path} holds no receipts")
    return out


def _mismatch(receipt: Receipt, chain: ChainState, key: Ed25519PublicKey) -> str:
    """Why ``receipt`` does not hold for this log ("" if it does)."""
    head = receipt.head
    if not head_signature_valid(head, key):
        return (f"its signature is not valid for the site's public key {key_id(key)} "
                f"(receipt key {head.get('key_id', '?')}): forged, or the site key was replaced")
    if head["count"] == 0:
        return ""  # attests an empty log: nothing to compare
    have = chain.hash_at(head["seq"])
    if have is None:
        return (f"the log no longer holds entry {head['seq']} the receipt attests "
                f"({chain.report.entries} entries now): history was deleted")
    if have != head["hash"]:
        return (f"entry {head['seq']} has hash {have[:16]}... but the receipt attests "
                f"{head['hash'][:16]}...: history before it was rewritten and re-signed")
    return ""


def check_receipts(directory: Path | str, receipts: Iterable[Receipt],
                   public_key: Ed25519PublicKey | bytes | str | Path | None = None
                   ) -> ReceiptCheck:
    """Does the log in ``directory`` still contain the history every receipt attests?

    A receipt is this site's if its signed head names the site or carries this key's id
    (so a log rewritten under another site name still meets its receipts). Raises
    `ReceiptFileError` if none is; the log itself must verify (see
    `datasites.governance.audit.verify`).
    """
    chain = scan_chain(directory, public_key)
    key = chain.public_key
    if not chain.report.ok or chain.head is None or key is None:
        raise AuditError(f"audit log in {directory} does not verify: {chain.report.problem}")
    site, kid = chain.head["site"], key_id(key)
    mine = [r for r in receipts if r.head["site"] == site or r.head.get("key_id") == kid]
    if not mine:
        raise ReceiptFileError(f"no receipt of site {site!r} (key {kid}) in the receipts given")
    latest = -1
    for receipt in mine:
        problem = _mismatch(receipt, chain, key)
        if not problem and receipt.head["site"] != site:
            problem = f"it is for site {receipt.head['site']!r} but the log is site {site!r}"
        if problem:
            return ReceiptCheck(False, site, len(mine), latest, problem, receipt)
        latest = max(latest, receipt.head["seq"])
    return ReceiptCheck(True, site, len(mine), latest)


def keep_peer_receipts(directory: Path | str, site: str, audit_keys: Mapping[str, str],
                       heads: Iterable[Mapping[str, Any]], *, job_id: str = "",
                       action: str = "") -> int:
    """Keep the other members' signed audit heads relayed with an aggregate this site
    verified, so that a rewrite of *their* history is detectable by *this* site too
    (``fedsyft audit verify --site THEIRS --receipts OURS/peer_receipts.jsonl``).

    Only heads that verify under the member's audit key from this site's own federation
    config are kept (the orchestrator relays them and could send garbage). Returns how
    many were kept."""
    from datasites.governance.audit import load_public_key

    kept = 0
    for head in heads:
        peer = head.get("site") if isinstance(head, Mapping) else None
        key = audit_keys.get(peer) if isinstance(peer, str) and peer != site else None
        if key is None or head_problem(head):
            continue
        try:
            if not head_signature_valid(head, load_public_key(key)):
                continue
        except AuditError:
            continue
        append_receipt(Path(directory) / PEER_RECEIPTS, peer, head, job_id=job_id,
                       action=action)
        kept += 1
    return kept
