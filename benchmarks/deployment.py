"""The same job in-process vs over HTTP: per-round wall time and peak RSS of every process.

One run builds a federation with ``fedsyft init`` (the bundled table, 3 sites), then trains
the same job (same rows, same spec) twice per aggregation mode:

- **in-process**: the harness's datasites, all in one Python process (as ``make demo``);
- **HTTP**: ``fedsyft up`` (one syft server process per site and the key authority on
  loopback), the data scientist in a client process over ``sy.login``.

Each arm's client runs in its own subprocess, so its peak RSS is its own; the servers' peak
RSS is their ``VmHWM`` read from ``/proc`` before ``fedsyft down``. Prints a table and writes
``benchmarks/results/deployment.json``.
Usage: ``python benchmarks/deployment.py [--rounds N] [--modes plain,secagg,paillier]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "deployment.json"
ROOT = Path(__file__).resolve().parents[1]
FEDSYFT = [sys.executable, "-m", "datasites.cli.main"]


def _passwords() -> dict[str, str]:
    """Fresh passwords for this run only (never printed)."""
    return {f"FEDSYFT_{role}_PASSWORD": f"Bench-{role.title()}-{secrets.token_urlsafe(12)}"
            for role in ("OWNER", "OFFICER", "SCIENTIST")}


def _spec(schema, mode: str, rounds: int):
    from fed_tasks.spec import JobSpec

    return JobSpec(features=schema.features, label_column=schema.label, rounds=rounds,
                   aggregation=mode, min_sites=2, seed=0)


def _summary(result, started: float, setup_s: float) -> dict:
    rounds = list(result.round_seconds)
    later = rounds[1:] or rounds
    return {"round_s": rounds, "mean_round_s": sum(later) / len(later),
            "setup_s": setup_s, "train_s": sum(rounds), "wall_s": time.perf_counter() - started,
            "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_in_process(config: Path, mode: str, rounds: int) -> dict:
    """The harness federation over the very tables (and splits) the servers hold."""
    from datasites.deploy.config import load
    from datasites.deploy.provision import site_tables
    from datasites.harness.federation import Federation

    started = time.perf_counter()
    cfg = load(config)
    schema, splits = site_tables(cfg)
    names = [s.name for s in cfg.site]
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        fed = Federation.start([splits[n] for n in names], schema, root=Path(root) / "sites",
                               names=names, key_authority=mode == "paillier")
        provision_s = time.perf_counter() - t
        t = time.perf_counter()
        spec = _spec(schema, mode, rounds)
        fed.approve_all(fed.submit(spec))
        setup_s = time.perf_counter() - t
        try:
            result = fed.trainer(spec, progress=False).fit()
        finally:
            fed.close()
    return {**_summary(result, started, setup_s), "provision_s": provision_s}


def run_http(config: Path, mode: str, rounds: int) -> dict:
    """The scientist over HTTP against the running servers; owners approve over HTTP."""
    from datasites.deploy.config import load
    from datasites.deploy.provision import site_tables
    from datasites.deploy.remote import OwnerClient, RemoteFederation

    started = time.perf_counter()
    cfg = load(config)
    schema, _ = site_tables(cfg)
    t = time.perf_counter()
    fed = RemoteFederation.connect(cfg)
    spec = _spec(schema, mode, rounds)
    for site, request in fed.submit(spec).items():
        OwnerClient.connect(cfg, site).approve(request, reason="benchmark")
    fed.wait_for_approval(spec, timeout=60)
    setup_s = time.perf_counter() - t
    result = fed.trainer(spec, progress=False).fit()
    return _summary(result, started, setup_s)


def _child(arm: str, config: Path, mode: str, rounds: int) -> None:
    run = run_in_process if arm == "in-process" else run_http
    print(json.dumps(run(config, mode, rounds)))


def _server_rss_mb(config: Path) -> dict[str, float]:
    """Peak RSS (VmHWM) of every running site server, from its pid file."""
    from datasites.deploy.config import load

    peaks = {}
    for member in load(config).members:
        pid = int((member.directory / "server.pid").read_text().split()[0])
        status = Path(f"/proc/{pid}/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines()
                  if line.startswith("VmHWM:"))
        peaks[member.name] = kb / 1024
    return peaks


def _cli(env: dict[str, str], *args: str) -> float:
    t = time.perf_counter()
    subprocess.run([*FEDSYFT, *args], check=True, env=env, cwd=ROOT, capture_output=True,
                   text=True)
    return time.perf_counter() - t


def _arm(env: dict[str, str], arm: str, config: Path, mode: str, rounds: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", arm, "--config", str(config),
                          "--modes", mode, "--rounds", str(rounds)],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{arm} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--modes", default="plain,secagg,paillier")
    ap.add_argument("--child", choices=["in-process", "http"])
    ap.add_argument("--config", type=Path)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.child:
        _child(args.child, args.config, modes[0], args.rounds)
        return
    env = {**os.environ, **_passwords(), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env["FEDSYFT_HOME"] = str(home / "scientist")
        _cli(env, "init", str(home / "fed"))
        config = home / "fed" / "federation.toml"
        up_s = _cli(env, "up", "--config", str(config))
        runs: dict[str, dict] = {}
        try:
            for mode in modes:
                for arm in ("in-process", "http"):
                    runs[f"{arm}/{mode}"] = _arm(env, arm, config, mode, args.rounds)
                    print(f"  {arm:10} {mode:8} mean round "
                          f"{runs[f'{arm}/{mode}']['mean_round_s']:.2f} s", flush=True)
            servers = _server_rss_mb(config)
        finally:
            _cli(env, "down", "--config", str(config))
    summary = {"rounds": args.rounds, "sites": 3, "table": "bundled shuttle sample",
               "fedsyft_up_s": up_s, "runs": runs, "server_peak_rss_mb": servers,
               "http_round_speedup": {m: runs[f"in-process/{m}"]["mean_round_s"]
                                      / runs[f"http/{m}"]["mean_round_s"] for m in modes}}
    _print(summary, modes)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print(f"written {RESULTS}")


def _print(summary: dict, modes: list[str]) -> None:
    runs = summary["runs"]
    print(f"\nsame job, 3 sites, {summary['rounds']} rounds; fedsyft up (provision and start "
          f"3 sites + key authority): {summary['fedsyft_up_s']:.1f} s; in-process "
          f"provisioning: {runs[f'in-process/{modes[0]}']['provision_s']:.1f} s")
    print(f"{'mode':10}{'':34}{'in-process':>12}{'HTTP':>12}")
    for mode in modes:
        a, b = runs[f"in-process/{mode}"], runs[f"http/{mode}"]
        for label, key in (("mean round, after the first (s)", "mean_round_s"),
                           ("submit + every owner approves (s)", "setup_s"),
                           ("client peak RSS (MB)", "client_peak_rss_mb")):
            print(f"{mode:10}{label:34}{a[key]:>12.2f}{b[key]:>12.2f}")
        print(f"{mode:10}{'HTTP round speed-up':34}{'':>12}"
              f"{summary['http_round_speedup'][mode]:>11.1f}x")
    print("server peak RSS (MB): " + ", ".join(
        f"{k} {v:.0f}" for k, v in summary["server_peak_rss_mb"].items()))


if __name__ == "__main__":
    main()
