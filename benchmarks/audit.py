"""Cost of the audit log: one append (hash, fsync, signed head) vs a bare fsync'd append.

Also: opening a log (full verification), `verify` of the whole chain, and the compliance
officer's login (scrypt). Prints a table and writes ``benchmarks/results/audit.json``.
Usage: ``python benchmarks/audit.py [--entries N] [--dir PATH]`` (``--dir`` picks the disk;
the default is a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from datasites.governance.audit import Action, AuditLog, Role, canonical_json, verify
from datasites.runtime.site_files import check_officer, store_officer

RESULTS = Path(__file__).parent / "results" / "audit.json"
PARAMS = {"action": "fit", "call": 3, "round": 3, "limit": 10, "spec_fingerprint": "ab" * 8,
          "payload_sha256": "cd" * 32, "payload_bytes": 13145}


def _ms(samples: list[float]) -> dict[str, float]:
    return {"median_ms": 1e3 * statistics.median(samples),
            "p95_ms": 1e3 * sorted(samples)[int(0.95 * (len(samples) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedsyft-audit-bench-", dir=args.dir))

    # baseline: the same line appended and fsynced, nothing else
    line = (canonical_json({"seq": 0, "params": PARAMS, "hash": "0" * 64}) + "\n").encode()
    fd = os.open(root / "plain.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    plain = []
    for _ in range(args.entries):
        t = time.perf_counter()
        os.write(fd, line)
        os.fsync(fd)
        plain.append(time.perf_counter() - t)
    os.close(fd)

    site = root / "site"
    appends = []
    with AuditLog(site, "bench-site") as log:
        for k in range(args.entries):
            t = time.perf_counter()
            log.append("ds@uni.org", Role.DATA_SCIENTIST, Action.FUNCTION_EXECUTED,
                       objects={"job_id": "1a2b3c4d", "request_id": f"r{k}"},
                       code_hash="ef" * 32, params=PARAMS)
            appends.append(time.perf_counter() - t)
    t = time.perf_counter()
    AuditLog(site, "bench-site").close()
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    ok = verify(site).ok
    verify_s = time.perf_counter() - t
    store_officer(root, "dpo@site.org", "a-long-officer-password")
    t = time.perf_counter()
    check_officer(root, "dpo@site.org", "a-long-officer-password")
    login_s = time.perf_counter() - t

    result = {
        "entries": args.entries, "verify_ok": ok,
        "append": _ms(appends), "baseline_fsync_append": _ms(plain),
        "append_overhead_x": statistics.median(appends) / statistics.median(plain),
        "open_s": open_s, "verify_s": verify_s,
        "log_bytes": (site / "audit.jsonl").stat().st_size, "officer_login_s": login_s,
    }
    print(f"{'audit log, ' + str(args.entries) + ' entries':<40} {'median':>10} {'p95':>10}")
    print(f"{'append (hash, fsync, signed head)':<40} {result['append']['median_ms']:>8.2f}ms "
          f"{result['append']['p95_ms']:>8.2f}ms")
    print(f"{'baseline: bare fsync append':<40} "
          f"{result['baseline_fsync_append']['median_ms']:>8.2f}ms "
          f"{result['baseline_fsync_append']['p95_ms']:>8.2f}ms")
    print(f"overhead {result['append_overhead_x']:.1f}x; open (full check) {open_s:.3f} s; "
          f"verify {verify_s:.3f} s; {result['log_bytes'] / args.entries:.0f} bytes/entry; "
          f"officer login (scrypt) {login_s * 1e3:.0f} ms")
    shutil.rmtree(root, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
