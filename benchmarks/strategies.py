"""Which strategy helps when sites' data differ: a non-IID sweep.

For shuttle and pima (bundled, label ``anomaly``), Dirichlet alpha in {0.1, 0.5, 10} over the
first feature (0.1: each site sees a narrow slice of it; 10: nearly IID), 3 and 8 sites,
each site with its own stratified 30 % test split, the autoencoder is trained by every
strategy of :data:`fed_tasks.strategies.REGISTRY` on in-memory :class:`LocalSite`\\ s (the
site step of a datasite; plain sums, which the secure modes reproduce up to fixed-point
error, tested elsewhere). In the same run, for each cell: **centralized** (one site with
every train row) and **local-only** (each site's model alone, scored on the pooled test
rows, mean over sites). Metric: ROC-AUC on the pooled test rows (union of the sites' test
splits). A split that cannot give every site its minimum rows is reported as skipped.

Usage: ``python benchmarks/strategies.py [--seeds 0] [--rounds 10] [--tables shuttle,pima]
[--alphas 0.1,0.5,10] [--sites 3,8] [--strategies a,b]``; prints the table and writes
``benchmarks/results/strategies.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

RESULTS = Path(__file__).parent / "results" / "strategies.json"
DATA = Path(__file__).parents[1] / "datasites" / "data"
LABEL = "anomaly"
BASELINES = ("centralized", "local-only")


def load(name: str) -> tuple[pd.DataFrame, Any]:
    from datasites.runtime.tables import infer_schema, read_table

    frame = read_table(DATA / f"{name}.csv.gz")
    return frame, infer_schema(frame, LABEL)


def splits_for(frame: pd.DataFrame, schema: Any, sites: int, alpha: float, seed: int
               ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """The demo's partition: Dirichlet over the first feature, a stratified test split each."""
    from datasites.harness.partition import dirichlet_split, train_test_split

    parts = dirichlet_split(frame, sites, by=schema.features[0], alpha=alpha, seed=seed)
    return [train_test_split(p, 0.3, seed=seed + i, label=schema.label)
            for i, p in enumerate(parts)]


def spec_for(strategy: str, schema: Any, sites: int, seed: int, rounds: int) -> Any:
    from datasites.cli.job_options import strategy_options
    from fed_tasks.spec import JobSpec

    return JobSpec(model="ae", features=schema.features, label_column=schema.label,
                   rounds=rounds, seed=seed, target_fpr=None,
                   **strategy_options(strategy, sites))


def pooled_auc(weights_result: Any, splits: list, schema: Any) -> float:
    from datasites.harness.demo import _pooled

    return float(_pooled(weights_result, [te for _, te in splits], schema)["roc_auc"])


def train(spec: Any, sites: list[tuple[str, pd.DataFrame, pd.DataFrame]]) -> Any:
    from fed_tasks.local import LocalSite
    from fed_tasks.orchestrator import FederatedTrainer

    conns = [LocalSite(name, spec, tr, te) for name, tr, te in sites]
    return FederatedTrainer(spec, conns, progress=False).fit()


def cell(strategies: list[str], frame: pd.DataFrame, schema: Any, sites: int, alpha: float,
         seed: int, rounds: int) -> dict[str, Any]:
    """Every strategy and both baselines on one partition; ROC-AUC and seconds each."""
    splits = splits_for(frame, schema, sites, alpha, seed)
    named = [(f"site-{i + 1}", tr, te) for i, (tr, te) in enumerate(splits)]
    out: dict[str, Any] = {"rows_per_site": [len(tr) + len(te) for tr, te in splits]}
    for name in strategies:
        started = time.perf_counter()
        result = train(spec_for(name, schema, sites, seed, rounds), named)
        out[name] = {"roc_auc": pooled_auc(result, splits, schema),
                     "seconds": time.perf_counter() - started}
    base = spec_for("fedavg", schema, 1, seed, rounds).model_copy(update={"min_sites": 1})
    union = pd.concat([tr for tr, _ in splits], ignore_index=True)
    out["centralized"] = {"roc_auc": pooled_auc(train(base, [("central", union,
                                                               splits[0][1])]), splits, schema)}
    alone = [pooled_auc(train(base, [site]), splits, schema) for site in named]
    out["local-only"] = {"roc_auc": float(np.mean(alone)), "per_site": alone}
    return out


def summarise(runs: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Mean over seeds per (table, alpha, sites); which strategy is best; does any beat
    FedAvg by more than the seed-to-seed noise (0.005)?"""
    keys = sorted({(r["table"], r["alpha"], r["sites"]) for r in runs},
                  key=lambda k: (k[0], k[2], k[1]))
    rows = []
    for table, alpha, sites in keys:
        mine = [r for r in runs if (r["table"], r["alpha"], r["sites"]) == (table, alpha, sites)]
        if any("skipped" in r for r in mine):
            rows.append({"table": table, "alpha": alpha, "sites": sites,
                         "skipped": mine[0].get("skipped")})
            continue
        mean = {c: float(np.mean([r[c]["roc_auc"] for r in mine])) for c in columns}
        fed = [c for c in columns if c not in BASELINES]
        best = max(fed, key=lambda c: mean[c])
        rows.append({"table": table, "alpha": alpha, "sites": sites, "seeds": len(mine),
                     "roc_auc": mean, "best": best,
                     "best_gain_over_fedavg": mean[best] - mean.get("fedavg", mean[best])})
    return rows


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| table | α | sites | " + " | ".join(columns) + " | best |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['table']} | {r['alpha']:g} | {r['sites']} | "
                         + " | ".join("–" for _ in columns) + f" | skipped: {r['skipped']} |")
            continue
        best = r["roc_auc"][r["best"]]
        cells = [f"**{r['roc_auc'][c]:.3f}**" if c == r["best"] or r["roc_auc"][c] == best
                 else f"{r['roc_auc'][c]:.3f}" for c in columns]
        lines.append(f"| {r['table']} | {r['alpha']:g} | {r['sites']} | " + " | ".join(cells)
                     + f" | {r['best']} (+{r['best_gain_over_fedavg']:.3f} vs fedavg) |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if "skipped" not in r]
    tables = sorted({r["table"] for r in shown})
    fig, axes = plt.subplots(len(tables), 1, figsize=(12, 3.6 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        mine = [r for r in shown if r["table"] == table]
        width = 0.8 / len(columns)
        for j, c in enumerate(columns):
            ax.bar(np.arange(len(mine)) + j * width, [r["roc_auc"][c] for r in mine], width,
                   label=c, hatch="//" if c in BASELINES else None)
        ax.set_xticks(np.arange(len(mine)) + 0.4 - width / 2)
        ax.set_xticklabels([f"α={r['alpha']:g}, {r['sites']} sites" for r in mine])
        low = min(min(r["roc_auc"].values()) for r in mine)
        ax.set_ylim(max(0.0, low - 0.05), 1.0)
        ax.set_ylabel("pooled ROC-AUC")
        ax.set_title(f"{table}: autoencoder, strategies vs baselines")
    axes[0, 0].legend(ncol=5, fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    from fed_tasks.strategies import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tables", default="shuttle,pima")
    parser.add_argument("--alphas", default="0.1,0.5,10")
    parser.add_argument("--sites", default="3,8")
    parser.add_argument("--strategies", default=",".join(REGISTRY))
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(strategies) - set(REGISTRY))
    if unknown:
        parser.error(f"--strategies: unknown {unknown} (known: {', '.join(REGISTRY)})")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cells = [(t, a, n, s) for t in args.tables.split(",") for n in map(int, args.sites.split(","))
             for a in _floats(args.alphas) for s in seeds]
    started = time.perf_counter()
    runs, frames = [], {t: load(t) for t in args.tables.split(",")}
    for table, alpha, sites, seed in tqdm(cells, desc="cells"):
        frame, schema = frames[table]
        key = {"table": table, "alpha": alpha, "sites": sites, "seed": seed}
        try:
            runs.append({**key, **cell(strategies, frame, schema, sites, alpha, seed,
                                       args.rounds)})
        except ValueError as exc:  # too few rows for a site (or a one-class pooled test)
            runs.append({**key, "skipped": str(exc).splitlines()[0][:120]})
    columns = [*strategies, *BASELINES]
    rows = summarise(runs, columns)
    text = markdown(rows, columns)
    print(text)
    wall = time.perf_counter() - started
    print(f"\n{len(cells)} cells in {wall:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rounds": args.rounds, "seeds": seeds, "wall_s": wall,
                                   "summary": rows, "runs": runs}, indent=2))
    RESULTS.with_suffix(".md").write_text(text + "\n")
    plot(rows, columns, RESULTS.with_suffix(".png"))
    print(f"written to {RESULTS} (.md, .png)")


if __name__ == "__main__":
    main()
