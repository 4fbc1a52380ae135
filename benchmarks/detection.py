"""Which federated detector to use on a real table, and what federation buys over one site.

For every table (ODDS shuttle, breastw, pima: bundled, label ``anomaly``) and every detector
in :data:`fed_tasks.detectors.REGISTRY` (looked up at run time; ``lstm-ae`` is a time-series
model benchmarked separately, ``auto`` is model selection, not a detector), on the demo's
3 non-IID sites (Dirichlet alpha 0.5 over the first feature, stratified 30 % test per site),
per seed, all in the same run:

- **federated** — 3 in-memory :class:`~fed_tasks.local.LocalSite`\\ s, plain sums (the secure
  modes release the same sums; tested elsewhere), threshold calibrated at ``target_fpr``;
- **centralized** — the same job on one site holding the union of the train splits;
- **local-only** — each site's job alone, scored on the *pooled* test rows, averaged: what a
  site gets without federating;
- **IsolationForest** — scikit-learn, 200 trees, on the raw union of the train splits: the
  usual centralized baseline of the ODDS literature.

Metrics on the pooled test rows (union of the sites' test splits): ROC-AUC, PR-AUC, F1 and
false-positive rate at the calibrated threshold (federated: from the tp/fp/fn/tn each site
reports from ``evaluate``, summed), and wall seconds to produce the model(s). The verdict
per table (issue 13): the best federated detector's mean ROC-AUC is at least the
centralized IsolationForest's − 0.01 and above its own local-only mean.

Usage: ``python benchmarks/detection.py [--quick] [--seeds 0,1,2] [--models a,b]
[--tables x,y] [--rounds R]``; prints a table and writes ``benchmarks/results/detection.json``
and ``detection.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

RESULTS = Path(__file__).parent / "results" / "detection.json"
FIGURE = RESULTS.with_suffix(".png")
DATA = Path(__file__).parents[1] / "datasites" / "data"
TABLES = ("shuttle", "breastw", "pima")
LABEL = "anomaly"
TARGET_FPR = 0.05
MARGIN = 0.01  # the tolerance against the centralized IsolationForest
IF_TREES = 200
SKIP = ("lstm-ae", "auto")  # time series (separate benchmark); model selection
QUICK_ROWS = {"shuttle": 10_000}
QUICK_ROUNDS = 3
# a neural job's loss is "still falling" if its last round improved it by more than this
STILL_FALLING = 0.01
MODES = ("federated", "centralized", "local-only")
IF_NAME = "iforest-sklearn"


# ----------------------------------------------------------------------------- data


def load_table(name: str, rows: int | None) -> tuple[pd.DataFrame, Any]:
    """The bundled table and its schema; ``rows`` draws a stratified, seeded subsample so a
    quick run keeps the table's anomaly rate."""
    from datasites.runtime.tables import infer_schema, read_table

    frame = read_table(DATA / f"{name}.csv.gz")
    if rows is not None and rows < len(frame):
        frac = rows / len(frame)
        frame = (frame.groupby(LABEL, group_keys=False)
                 .sample(frac=frac, random_state=0).reset_index(drop=True))
    return frame, infer_schema(frame, LABEL)


def split(name: str, frame: pd.DataFrame, schema: Any, seed: int
          ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """The demo's own partition (3 sites, alpha 0.5 on the first feature), seeded."""
    from datasites.harness.demo import DemoConfig, partition

    return partition(frame, schema, DemoConfig(data=DATA / f"{name}.csv.gz", seed=seed,
                                               progress=False))


def detectors(wanted: list[str] | None) -> list[str]:
    """The registry's tabular detectors, read now: other detectors land while this runs."""
    from fed_tasks.detectors import REGISTRY

    names = [m for m in REGISTRY if m not in SKIP]
    if wanted is None:
        return names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"--models {unknown} not in the registry's tabular detectors {names}")
    return [m for m in names if m in wanted]


# ----------------------------------------------------------------------------- metrics


def f1_of(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def counts(labels: np.ndarray, alarm: np.ndarray) -> dict[str, int]:
    return {"tp": int(np.sum(alarm & (labels == 1))), "fp": int(np.sum(alarm & (labels == 0))),
            "fn": int(np.sum(~alarm & (labels == 1))), "tn": int(np.sum(~alarm & (labels == 0)))}


def scored(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """Ranking metrics, plus F1 / FPR where a threshold was calibrated."""
    from fed_tasks.evaluation import detection_metrics

    out: dict[str, Any] = {**detection_metrics(labels, scores), "f1": None, "fpr": None,
                           "constant_scores": bool(np.ptp(scores) == 0)}
    if threshold is not None:
        c = counts(labels, scores > threshold)
        out |= {"f1": f1_of(c["tp"], c["fp"], c["fn"]), "fpr": c["fp"] / (c["fp"] + c["tn"]),
                **c}
    return out


def pooled_test(splits: list[tuple[pd.DataFrame, pd.DataFrame]], schema: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    union = pd.concat([te for _, te in splits], ignore_index=True)
    return union.loc[:, list(schema.features)].to_numpy(np.float64), union[LABEL].to_numpy()


def result_metrics(result: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return scored(y, result.score_samples(x), result.threshold)


def loss_info(result: Any) -> dict[str, Any]:
    """Training diagnostics of a neural job: is the budget too short (P14)?"""
    losses = [float(v) for v in result.losses]
    info: dict[str, Any] = {"rounds_completed": len(losses)}
    if len(losses) >= 2 and losses[-2] > 0:
        info |= {"first_loss": losses[0], "last_loss": losses[-1],
                 "last_round_gain": (losses[-2] - losses[-1]) / losses[-2]}
        info["still_falling"] = bool(info["last_round_gain"] > STILL_FALLING)
    return info


# ----------------------------------------------------------------------------- runs


def job_spec(model: str, schema: Any, seed: int, rounds: int, min_sites: int) -> Any:
    from fed_tasks.spec import JobSpec

    return JobSpec(model=model, features=schema.features, label_column=schema.label,
                   rounds=rounds, seed=seed, target_fpr=TARGET_FPR, min_sites=min_sites)


def federated(model: str, splits: list, schema: Any, seed: int, rounds: int) -> dict[str, Any]:
    """The job across the 3 sites; F1 from the counts the sites themselves report."""
    from fed_tasks.local import LocalSite
    from fed_tasks.orchestrator import FederatedTrainer

    spec = job_spec(model, schema, seed, rounds, min_sites=len(splits))
    started = time.perf_counter()
    sites = [LocalSite(f"site-{i + 1}", spec, tr, te) for i, (tr, te) in enumerate(splits)]
    trainer = FederatedTrainer(spec, sites, progress=False)
    result = trainer.fit()
    per_site = trainer.evaluate(result)
    seconds = time.perf_counter() - started
    x, y = pooled_test(splits, schema)
    out = result_metrics(result, x, y)
    if all("tp" in s for s in per_site):
        summed = {k: sum(int(s[k]) for s in per_site) for k in ("tp", "fp", "fn", "tn")}
        # the orchestrator's model and the sites' own models must agree (plain sums)
        out["site_counts_match"] = all(out.get(k) == v for k, v in summed.items())
        out |= {**summed, "f1": f1_of(summed["tp"], summed["fp"], summed["fn"]),
                "fpr": summed["fp"] / (summed["fp"] + summed["tn"])}
    return {**out, **loss_info(result), "threshold": result.threshold, "seconds": seconds,
            "per_site": [{k: v for k, v in s.items() if k != "n_test"} for s in per_site]}


def centralized(model: str, splits: list, schema: Any, seed: int, rounds: int
                ) -> dict[str, Any]:
    """The same job on one site holding every train row (what pooling the data would give).

    Trained like ``demo.reference_models`` (plain, one site) but kept here: that helper
    returns neither the threshold metrics nor timings."""
    from datasites.harness.demo import _train_local
    from fed_tasks.local import LocalSite

    spec = job_spec(model, schema, seed, rounds, min_sites=1)
    union = pd.concat([tr for tr, _ in splits], ignore_index=True)
    tests = [te for _, te in splits]
    started = time.perf_counter()
    result, _ = _train_local(spec, [LocalSite("central", spec, union, tests[0])])
    seconds = time.perf_counter() - started
    x, y = pooled_test(splits, schema)
    return {**result_metrics(result, x, y), **loss_info(result), "seconds": seconds}


def local_only(model: str, splits: list, schema: Any, seed: int, rounds: int
               ) -> dict[str, Any]:
    """Each site's job on its own rows, scored on all sites' test rows; mean over sites.
    ``seconds`` is the total of the three site jobs."""
    from datasites.harness.demo import _train_local
    from fed_tasks.local import LocalSite

    spec = job_spec(model, schema, seed, rounds, min_sites=1)
    x, y = pooled_test(splits, schema)
    rows, seconds = [], 0.0
    for i, (train, test) in enumerate(splits):
        started = time.perf_counter()
        result, _ = _train_local(spec, [LocalSite(f"site-{i + 1}", spec, train, test)])
        seconds += time.perf_counter() - started
        rows.append({"site": f"site-{i + 1}", **result_metrics(result, x, y),
                     **loss_info(result)})
    mean = {k: _mean([r[k] for r in rows]) for k in ("roc_auc", "pr_auc", "f1", "fpr")}
    return {**mean, "constant_scores": any(r["constant_scores"] for r in rows),
            "seconds": seconds, "per_site": rows}


def sklearn_iforest(splits: list, schema: Any, seed: int) -> dict[str, Any]:
    """Centralized scikit-learn IsolationForest on raw features; its threshold follows the
    federated rule (the score ``target_fpr`` of the training rows exceed)."""
    from sklearn.ensemble import IsolationForest

    train = pd.concat([tr for tr, _ in splits], ignore_index=True)
    x_train = train.loc[:, list(schema.features)].to_numpy(np.float64)
    started = time.perf_counter()
    forest = IsolationForest(n_estimators=IF_TREES, random_state=seed).fit(x_train)
    threshold = float(np.quantile(-forest.score_samples(x_train), 1 - TARGET_FPR))
    x, y = pooled_test(splits, schema)
    scores = -forest.score_samples(x)  # sklearn: lower = more abnormal
    seconds = time.perf_counter() - started
    return {**scored(y, scores, threshold), "threshold": threshold, "seconds": seconds}


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "federated": federated, "centralized": centralized, "local-only": local_only}


def run_cell(model: str, splits: list, schema: Any, seed: int, rounds: int) -> dict[str, Any]:
    """One detector on one seed's split, all three modes; a failing detector (the registry
    is under active development) is recorded, not fatal to the benchmark."""
    out: dict[str, Any] = {}
    for mode, runner in RUNNERS.items():
        try:
            out[mode] = runner(model, splits, schema, seed, rounds)
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
            out[mode] = {"error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=4)}
            tqdm.write(f"!! {model} {mode} seed {seed}: {type(exc).__name__}: {exc}")
    return out


# ----------------------------------------------------------------------------- summary

METRICS = ("roc_auc", "pr_auc", "f1", "fpr", "seconds")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / min / max over seeds of each metric; errors and flags carried along."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"seeds_ok": len(ok), "errors": [r["error"] for r in runs
                                                           if "error" in r]}
    for m in METRICS:
        vals = [r[m] for r in ok if r.get(m) is not None]
        out[m] = float(np.mean(vals)) if vals else None
        out[f"{m}_min"] = min(vals) if vals else None
        out[f"{m}_max"] = max(vals) if vals else None
    out["still_falling"] = sum(bool(r.get("still_falling")) for r in ok)
    out["constant_scores"] = sum(bool(r.get("constant_scores")) for r in ok)
    if any("site_counts_match" in r for r in ok):
        out["site_counts_mismatch"] = sum(not r.get("site_counts_match", True) for r in ok)
    gains = [r["last_round_gain"] for r in ok if "last_round_gain" in r]
    out["last_round_gain"] = float(np.mean(gains)) if gains else None
    return out


def verdict(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's criterion for one table, on means over seeds."""
    fed = {m: s["federated"]["roc_auc"] for m, s in table.items()
           if m != IF_NAME and s["federated"].get("roc_auc") is not None}
    forest = table.get(IF_NAME, {}).get("roc_auc")
    if not fed or forest is None:
        return {"pass": False, "reason": "no federated detector or no IsolationForest result"}
    best = max(fed, key=lambda m: fed[m])
    local = table[best]["local-only"].get("roc_auc")
    vs_if = fed[best] >= forest - MARGIN
    vs_local = local is not None and fed[best] > local
    return {"best": best, "federated_roc_auc": fed[best], "iforest_roc_auc": forest,
            "local_only_roc_auc": local, "vs_iforest": vs_if, "vs_local_only": vs_local,
            "pass": bool(vs_if and vs_local)}


def warnings_for(name: str, table: dict[str, dict[str, Any]]) -> list[str]:
    """What looks wrong in a detector, for the lead (not part of the verdict)."""
    out = []
    for model, s in table.items():
        if model == IF_NAME:
            continue
        fed, loc = s["federated"], s["local-only"]
        for mode in MODES:
            for err in s[mode].get("errors", []):
                out.append(f"{name}/{model} {mode}: {err}")
        if fed.get("roc_auc") is not None and loc.get("roc_auc") is not None \
                and fed["roc_auc"] <= loc["roc_auc"]:
            out.append(f"{name}/{model}: federated ROC-AUC {fed['roc_auc']:.3f} is not above "
                       f"its local-only mean {loc['roc_auc']:.3f}")
        if fed.get("still_falling"):
            out.append(f"{name}/{model}: federated loss still falling after the last round in "
                       f"{fed['still_falling']}/{fed['seeds_ok']} seeds (last-round gain "
                       f"{fed['last_round_gain']:.1%})")
        if fed.get("constant_scores"):
            out.append(f"{name}/{model}: constant scores (collapsed) in "
                       f"{fed['constant_scores']} seeds")
        if fed.get("site_counts_mismatch"):
            out.append(f"{name}/{model}: sites' tp/fp/fn/tn differ from the orchestrator's "
                       f"model in {fed['site_counts_mismatch']} seeds")
        if fed.get("fpr") is not None and fed["fpr"] > 2 * TARGET_FPR:
            out.append(f"{name}/{model}: pooled test FPR {fed['fpr']:.3f} is over twice the "
                       f"target {TARGET_FPR}")
    return out


# ----------------------------------------------------------------------------- output


def _fmt(s: dict[str, Any], m: str) -> str:
    v = s.get(m)
    if v is None:
        return "-"
    if m == "seconds":
        return f"{v:.1f}"
    if s.get("seeds_ok", 1) > 1 and s.get(f"{m}_min") is not None:
        return f"{v:.3f} [{s[f'{m}_min']:.3f},{s[f'{m}_max']:.3f}]"
    return f"{v:.3f}"


def print_table(summary: dict[str, dict[str, dict[str, Any]]],
                verdicts: dict[str, dict[str, Any]]) -> None:
    head = (f"{'table':<8} {'detector':<16} {'mode':<12} {'ROC-AUC mean [min,max]':>24} "
            f"{'PR-AUC mean [min,max]':>24} {'F1 mean [min,max]':>24} {'FPR':>6} {'s':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, table in summary.items():
        for model, s in table.items():
            for mode in ((IF_NAME,) if model == IF_NAME else MODES):
                row = s if model == IF_NAME else s[mode]
                label = "centralized" if model == IF_NAME else mode
                err = " ERROR" if row.get("errors") and not row.get("seeds_ok") else ""
                fpr = "-" if row.get("fpr") is None else f"{row['fpr']:.3f}"
                print(f"{name:<8} {model:<16} {label:<12} {_fmt(row, 'roc_auc'):>24} "
                      f"{_fmt(row, 'pr_auc'):>24} {_fmt(row, 'f1'):>24} {fpr:>6} "
                      f"{_fmt(row, 'seconds'):>7}{err}")
        v = verdicts[name]
        if "best" in v:
            print(f"{name:<8} {'PASS' if v['pass'] else 'FAIL'}: best federated {v['best']} "
                  f"{v['federated_roc_auc']:.3f} vs IsolationForest {v['iforest_roc_auc']:.3f} "
                  f"- {MARGIN} ({'ok' if v['vs_iforest'] else 'below'}), vs its local-only "
                  f"{v['local_only_roc_auc']:.3f} ({'ok' if v['vs_local_only'] else 'not above'})")
        else:
            print(f"{name:<8} FAIL: {v['reason']}")
        print()


def plot(summary: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """Grouped bars of pooled ROC-AUC per table: each detector federated (whiskers: min–max
    over seeds), its local-only mean (x) and centralized (-) marked, IsolationForest hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    models = [m for m in dict.fromkeys(m for t in summary.values() for m in t) if m != IF_NAME]
    slots = models + [IF_NAME]
    width = 0.8 / len(slots)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 2.2 * len(names)) + 2.6, 4.5))
    lows = []
    for j, model in enumerate(slots):
        xs, ys, lo, hi, loc, cen = [], [], [], [], [], []
        for i, name in enumerate(names):
            s = summary[name].get(model)
            row = s if model == IF_NAME else (s or {}).get("federated")
            if not row or row.get("roc_auc") is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(row["roc_auc"])
            lo.append(row["roc_auc"] - row["roc_auc_min"])
            hi.append(row["roc_auc_max"] - row["roc_auc"])
            if model != IF_NAME:
                loc.append(s["local-only"].get("roc_auc", math.nan) or math.nan)
                cen.append(s["centralized"].get("roc_auc", math.nan) or math.nan)
        if not xs:
            continue
        lows.extend(ys)
        if model == IF_NAME:
            ax.bar(xs, ys, width, yerr=[lo, hi], color="lightgrey", edgecolor="black",
                   hatch="//", label="IsolationForest (centralized, sklearn)", capsize=2)
            continue
        ax.bar(xs, ys, width, yerr=[lo, hi], color=colours(j), label=f"{model} (federated)",
               capsize=2)
        ax.scatter(xs, loc, marker="x", color="black", zorder=3,
                   label="local-only mean" if j == 0 else None)
        ax.scatter(xs, cen, marker="_", s=200, color="red", zorder=3,
                   label="centralized (same detector)" if j == 0 else None)
        lows.extend(v for v in loc if not math.isnan(v))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("pooled test ROC-AUC")
    ax.set_ylim(max(0.0, min(lows, default=0.5) - 0.05), 1.0)
    ax.set_title("Federated detectors on 3 non-IID sites (mean over seeds, bars: min–max)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    from datasites.harness.demo import DemoConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"1 seed, shuttle subsampled to {QUICK_ROWS['shuttle']:,} rows, "
                         f"{QUICK_ROUNDS} rounds")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick 0)")
    ap.add_argument("--models", default=None, help="comma-separated registry names")
    ap.add_argument("--tables", default=None, help=f"comma-separated of {','.join(TABLES)}")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"training rounds (default: the demo's {DemoConfig().rounds}; "
                         f"quick {QUICK_ROUNDS})")
    args = ap.parse_args()
    seeds = [int(s) for s in _csv(args.seeds) or (["0"] if args.quick else ["0", "1", "2"])]
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DemoConfig().rounds)
    tables = _csv(args.tables) or list(TABLES)
    if set(tables) - set(TABLES):
        raise SystemExit(f"--tables {sorted(set(tables) - set(TABLES))} not in {TABLES}")
    models = detectors(_csv(args.models))
    print(f"detectors {models}; tables {tables}; seeds {seeds}; rounds {rounds}; "
          f"target FPR {TARGET_FPR}", flush=True)

    started = time.perf_counter()
    loaded = {n: load_table(n, QUICK_ROWS.get(n) if args.quick else None) for n in tables}
    cells = [(n, s, m) for n in tables for s in seeds for m in [*models, IF_NAME]]
    runs: dict[str, dict[str, list]] = {n: {m: [] for m in [*models, IF_NAME]} for n in tables}
    split_cache: dict[tuple[str, int], list] = {}
    bar = tqdm(cells, unit="cell")
    for name, seed, model in bar:
        bar.set_description(f"{name} s{seed} {model}")
        frame, schema = loaded[name]
        if (name, seed) not in split_cache:
            split_cache[(name, seed)] = split(name, frame, schema, seed)
        splits = split_cache[(name, seed)]
        if model == IF_NAME:
            runs[name][model].append({"seed": seed, **sklearn_iforest(splits, schema, seed)})
        else:
            runs[name][model].append({"seed": seed,
                                      **run_cell(model, splits, schema, seed, rounds)})
    bar.close()
    wall = time.perf_counter() - started

    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name in tables:
        summary[name] = {m: {mode: summarise([r[mode] for r in runs[name][m]])
                             for mode in MODES} for m in models}
        summary[name][IF_NAME] = summarise(runs[name][IF_NAME])
    verdicts = {n: verdict(summary[n]) for n in tables}
    notes = [w for n in tables for w in warnings_for(n, summary[n])]
    print_table(summary, verdicts)
    for w in notes:
        print(f"note: {w}")
    sites = {n: [[{"train": len(tr), "test": len(te), "test_anomalies": int(te[LABEL].sum())}
                  for tr, te in split_cache[(n, s)]] for s in seeds] for n in tables}
    report = {
        "config": {"quick": args.quick, "seeds": seeds, "rounds": rounds, "tables": tables,
                   "models": models, "target_fpr": TARGET_FPR, "margin": MARGIN,
                   "iforest_trees": IF_TREES, "sites": 3, "alpha": DemoConfig().alpha,
                   "rows": {n: len(loaded[n][0]) for n in tables}},
        "site_rows": sites, "summary": summary, "verdicts": verdicts, "notes": notes,
        "runs": runs, "wall_seconds": wall,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, default=str))
    plot(summary, FIGURE)
    print(f"wall {wall:.0f} s; written {RESULTS} and {FIGURE}")


if __name__ == "__main__":
    main()
