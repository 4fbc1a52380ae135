"""`fedsyft demo --epsilon E`, as a new user types it, run several times per epsilon.

DP noise is seeded from ``secrets``, so runs differ: the claim "--epsilon 3 keeps pooled
ROC-AUC >= 0.99" must hold in every run, not on average. Each run is the real CLI through
PySyft datasites (its own process), on the bundled shuttle table; the untrained model's
score on the sites' held-out rows (which every DP report carries) is the floor beside it.

Usage: ``python benchmarks/dp_demo.py [--runs 5] [--epsilons 3 1]``; prints a table and writes
``benchmarks/results/dp_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "dp_demo.json"
#: what the issue asks of each epsilon, in every run
REQUIRED = {3.0: 0.99, 1.0: 0.98}
FEDSYFT = Path(sys.executable).parent / "fedsyft"


def one_run(epsilon: float, directory: Path, index: int) -> dict:
    report = directory / f"eps{epsilon:g}-{index}.json"
    started = time.perf_counter()
    subprocess.run([str(FEDSYFT), "demo", "--epsilon", f"{epsilon:g}", "--report", str(report)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    doc = json.loads(report.read_text())
    check = doc.get("noise_check") or {}
    return {"epsilon": epsilon, "dp": doc["dp"], "roc_auc": doc["federated"]["roc_auc"],
            "pr_auc": doc["federated"]["pr_auc"], "epsilon_spent": doc["epsilon_spent"],
            "noise_to_signal": doc.get("noise_to_signal"),
            "untrained_roc_auc_sites": check.get("untrained_roc_auc"),
            "roc_auc_sites": check.get("roc_auc"),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=sorted(REQUIRED,
                                                                           reverse=True))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in args.epsilons:
            for i in range(args.runs):
                runs.append(one_run(eps, Path(tmp), i))
                r = runs[-1]
                print(f"epsilon {eps:g} run {i + 1}: {r['dp']} pooled ROC-AUC "
                      f"{r['roc_auc']:.4f} ({r['seconds']:.0f} s)", flush=True)
    summary = []
    print("\n| `fedsyft demo --epsilon` | DP unit chosen | runs | pooled ROC-AUC min | mean | "
          "max | required in every run | met | noise/signal | untrained (sites' mean) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for eps in args.epsilons:
        rows = [r for r in runs if r["epsilon"] == eps]
        aucs = [r["roc_auc"] for r in rows]
        need = REQUIRED.get(eps)
        row = {"epsilon": eps, "dp": rows[0]["dp"], "runs": len(rows), "min": min(aucs),
               "mean": sum(aucs) / len(aucs), "max": max(aucs), "required": need,
               "met": None if need is None else all(a >= need for a in aucs),
               "noise_to_signal": rows[0]["noise_to_signal"],
               "untrained_roc_auc_sites": rows[0]["untrained_roc_auc_sites"]}
        summary.append(row)
        print(f"| {eps:g} | {row['dp']} | {row['runs']} | {row['min']:.4f} | {row['mean']:.4f} "
              f"| {row['max']:.4f} | {need if need is not None else '-'} | "
              f"{'yes' if row['met'] else 'no' if row['met'] is False else '-'} | "
              f"{row['noise_to_signal']:.3g} | {row['untrained_roc_auc_sites']:.3f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
