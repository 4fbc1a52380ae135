"""What buffered asynchronous rounds (``--async K``, FedBuff) buy when one site is slow.

Shuttle (bundled), four non-IID sites (Dirichlet 0.5 over the first feature, a stratified
30 % test split each), the autoencoder, plain mode, through the real site code in-process
(:func:`datasites.runtime.direct.direct_federation`: signatures, each site's verified model
and its checks of every aggregate). One site sleeps ``--delay`` seconds before each
training call: a slower institution. In the same run, per seed:

- **sync, all fast**: every site answers at full speed (the reference model);
- **sync, one slow**: every round waits for the slow site;
- **async K=3, one slow**: each round is formed once three updates are in; the slow site's
  update joins a later round, weighted ``(1 + staleness)^-½``;
- the last two again in ``paillier``: there the key authority forms each buffer as one
  sum, weighing each stale ciphertext itself;
- and in ``secagg``: each round one masked sum over the sites called; the slow site,
  recovered for the round it was too late for, masks its update again (weighed by itself)
  into the round after it finished.

Reported: the training wall time (``fit``), the pooled test ROC-AUC, and how many of the
slow site's updates were applied and how stale they were.

Usage: ``python benchmarks/async_rounds.py [--seeds 0,1,2] [--rounds 10] [--delay 1]``;
prints the table and writes ``benchmarks/results/async_rounds.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results" / "async_rounds.json"
DATA = Path(__file__).parents[1] / "datasites" / "data"
SETTINGS = ("sync, all fast", "sync, one slow", "async K=3, one slow",
            "paillier sync, one slow", "paillier async K=3, one slow",
            "secagg sync, one slow", "secagg async K=3, one slow")


def make_slow(site: Any, delay: float) -> None:
    """The site's training step takes ``delay`` seconds longer (its other work does not:
    in secagg, masking a late update again into a later round stays quick)."""
    privacy = site.guard.privacy
    train = privacy.run_step

    def slow_step(job: Any, action: str, *args: Any, **kwargs: Any) -> Any:
        if action == "fit":
            time.sleep(delay)
        return train(job, action, *args, **kwargs)

    privacy.run_step = slow_step


def splits(seed: int) -> tuple[dict[str, tuple[pd.DataFrame, pd.DataFrame]], Any]:
    from datasites.harness.partition import dirichlet_split, train_test_split
    from datasites.runtime.tables import infer_schema, read_table

    frame = read_table(DATA / "shuttle.csv.gz")
    schema = infer_schema(frame, "anomaly")
    parts = dirichlet_split(frame, 4, by=schema.features[0], alpha=0.5, seed=seed)
    return ({f"site-{i}": train_test_split(p, 0.3, seed=seed + i, label=schema.label)
             for i, p in enumerate(parts)}, schema)


def run(setting: str, seed: int, rounds: int, delay: float) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from datasites.runtime.direct import direct_federation, direct_paillier_federation
    from fed_tasks.aggregation import KeyAuthoritySum, MaskedSum
    from fed_tasks.orchestrator import FederatedTrainer
    from fed_tasks.spec import JobSpec

    frames, schema = splits(seed)
    paillier = setting.startswith("paillier")
    mode = setting.split()[0] if setting.startswith(("paillier", "secagg")) else "plain"
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=rounds,
                   min_sites=3, seed=seed, async_k=3 if "async" in setting else None,
                   aggregation=mode)
    with tempfile.TemporaryDirectory() as tmp:
        authority = None
        if paillier:
            sites, authority, _ = direct_paillier_federation(tmp, spec, frames)
        else:
            sites = direct_federation(tmp, spec, frames)
        if "slow" in setting:
            make_slow(sites[-1], delay)
        try:
            secure = (KeyAuthoritySum(authority) if authority else
                      MaskedSum(spec, len(sites)) if mode == "secagg" else None)
            trainer = FederatedTrainer(spec, sites, progress=False, secure_sum=secure)
            started = time.perf_counter()
            result = trainer.fit()
            seconds = time.perf_counter() - started
            trainer.evaluate(result)  # waits for a slow site's last call, as a job does
        finally:
            for s in [*sites, *([authority] if authority else [])]:
                s.close()
    test = pd.concat([te for _, te in frames.values()])
    scores = result.score_samples(test.loc[:, list(schema.features)].to_numpy(float))
    slow = [b["staleness"] for b in result.buffered if b["site"] == "site-3"]
    return {"setting": setting, "seed": seed, "rounds": result.rounds_completed,
            "fit_seconds": round(seconds, 2),
            "roc_auc": round(float(roc_auc_score(test[schema.label].to_numpy(int), scores)), 4),
            "slow_updates_applied": len(slow) if result.buffered else rounds,
            "slow_staleness": slow}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--delay", type=float, default=1.0)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    run(SETTINGS[0], seeds[0], 1, 0.0)  # warm-up (imports, torch), not reported
    rows = []
    for seed in seeds:
        for setting in SETTINGS:
            rows.append(run(setting, seed, args.rounds, args.delay))
            r = rows[-1]
            print(f"seed {seed}  {setting:<28} fit {r['fit_seconds']:7.1f} s  ROC-AUC "
                  f"{r['roc_auc']:.4f}  slow site's updates applied {r['slow_updates_applied']}"
                  f"  staleness {r['slow_staleness']}", flush=True)
    summary = {}
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        summary[setting] = {"fit_seconds_mean": round(float(np.mean(
            [r["fit_seconds"] for r in mine])), 2), "roc_auc_mean": round(float(np.mean(
                [r["roc_auc"] for r in mine])), 4)}
    gap = [abs(a["roc_auc"] - b["roc_auc"]) for a, b in zip(
        [r for r in rows if r["setting"] == SETTINGS[2]],
        [r for r in rows if r["setting"] == SETTINGS[0]], strict=True)]
    print("\n| setting | fit s (mean) | ROC-AUC (mean) |\n|---|---|---|")
    for setting, s in summary.items():
        print(f"| {setting} | {s['fit_seconds_mean']:.1f} | {s['roc_auc_mean']:.4f} |")
    print(f"largest |ROC-AUC(async, one slow) - ROC-AUC(sync, all fast)| over seeds: "
          f"{max(gap):.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"seeds": seeds, "rounds": args.rounds, "delay_s": args.delay,
                                   "runs": rows, "summary": summary,
                                   "max_roc_gap_vs_sync": round(max(gap), 4)}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
