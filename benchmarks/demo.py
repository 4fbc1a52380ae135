"""Cost of the datasites: the demo job through PySyft vs the same job as in-memory FedAvg.

Each variant runs in its own subprocess (so peak RSS is its own); the parent prints a table
and writes ``benchmarks/results/demo.json``. Usage: ``python benchmarks/demo.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "demo.json"


def _variant(name: str, rounds: int, sites: int) -> dict:
    from datasites.harness.demo import BUNDLED_TABLE, DemoConfig, partition
    from datasites.runtime.tables import infer_schema, read_table
    from fed_tasks.local import LocalSite
    from fed_tasks.orchestrator import FederatedTrainer
    from fed_tasks.spec import JobSpec

    started = time.perf_counter()
    cfg = DemoConfig(rounds=rounds, sites=sites, progress=False)
    frame = read_table(BUNDLED_TABLE)
    schema = infer_schema(frame, "anomaly")
    splits = partition(frame, schema, cfg)
    spec = JobSpec(features=schema.features, label_column="anomaly", rounds=rounds)
    names = [f"site-{i + 1}" for i in range(sites)]
    setup = time.perf_counter()
    if name == "syft":
        from datasites.harness.federation import Federation

        fed = Federation.start(splits, schema, names=names)
        fed.approve_all(fed.submit(spec))
        conns = fed.connections(spec)
    else:
        fed = None
        conns = [LocalSite(n, spec, tr, te) for n, (tr, te) in zip(names, splits, strict=True)]
    setup = time.perf_counter() - setup
    trainer = FederatedTrainer(spec, conns, progress=False)
    t = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t
    metrics = trainer.evaluate(result)
    if fed is not None:
        fed.close()
    return {
        "variant": name, "sites": sites, "rounds": rounds,
        "wall_s": time.perf_counter() - started, "setup_s": setup, "train_s": train_s,
        "round_s": result.round_seconds,
        "mean_round_s": sum(result.round_seconds[1:]) / max(1, len(result.round_seconds) - 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "roc_auc_per_site": [m["roc_auc"] for m in metrics],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--variant", choices=["syft", "memory"])
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(_variant(args.variant, args.rounds, args.sites)))
        return
    runs = {}
    for variant in ("memory", "syft"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--rounds",
                              str(args.rounds), "--sites", str(args.sites)],
                             capture_output=True, text=True, check=True)
        runs[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    mem, syft = runs["memory"], runs["syft"]
    overhead = (syft["mean_round_s"] - mem["mean_round_s"]) / args.sites
    summary = {"runs": runs, "syft_overhead_per_site_round_s": overhead,
               "syft_round_slowdown": syft["mean_round_s"] / mem["mean_round_s"]}
    rows = [("wall time (s)", "wall_s"), ("setup: provision + approve (s)", "setup_s"),
            ("training (s)", "train_s"), ("mean round, after the first (s)", "mean_round_s"),
            ("peak RSS (MB)", "peak_rss_mb")]
    print(f"demo job: {args.sites} sites, {args.rounds} rounds, bundled shuttle table")
    print(f"{'':34}{'in-memory FedAvg':>18}{'PySyft datasites':>18}")
    for label, key in rows:
        print(f"{label:34}{mem[key]:>18.2f}{syft[key]:>18.2f}")
    print(f"syft overhead per site-round: {overhead:.3f} s "
          f"(round {summary['syft_round_slowdown']:.2f}x the in-memory round)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
