"""What differential privacy costs in detection quality on the demo's 3 non-IID sites.

Pooled ROC-AUC / PR-AUC (union of the sites' private test splits) of the released model at
epsilon in {1, 3, 10, inf}, for client-level DP-FedAvg and for sample-level DP-SGD, with the
non-private federated model and the *untrained* autoencoder as baselines in the same run.

Sites are the in-memory :class:`fed_tasks.local.LocalSite` running the same site step as a
datasite (clipping, noise, unit weight, loss withheld), with the datasite's rule that a DP
job's feature scaling comes from the published mocks. Secure aggregation returns the same
sum as adding the vectors in clear (up to fixed-point rounding, tested elsewhere), so
"secure" rows add each site's 1/3 noise share and sum in clear. DP noise is seeded from
``secrets`` (as at a real site), so every DP configuration is repeated (``--repeats``, 5 by
default) and the mean and range are reported. ``--syft`` adds one DP-SGD job through real
PySyft datasites.

Adaptive clipping (``dp_adaptive_clip``, Andrew et al. 2021) needs rounds to adapt in, so
its rows use the demo job's 10 rounds x 2 epochs (whose non-private model is the second
row), beside fixed-clip rows on the same schedule; the starting clip is 1.0 or 0.1, the
target quantile 0.5, the clip learning rate 0.2 and σ_b the spec's default.

The detectors built from sums (pca, hbos) get their own table: row-level DP on each summed
release (fed_tasks/dp_sums.py) at epsilon in {0.5, 1, 3}, with the alarm threshold
(target_fpr 0.05) calibrated under the same epsilon, ``SUM_REPEATS`` runs per cell (mean,
min, max), beside the non-private detectors and the distance ‖z‖² of the mock-standardized
row (an untrained pca: identity covariance) as the floor.

Usage: ``python benchmarks/privacy_utility.py [--repeats 5] [--syft] [--sums-only]``; prints
the tables and writes ``benchmarks/results/privacy_utility.json`` (``--sums-only`` runs only
the sum detectors and replaces just their rows in an existing file).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "privacy_utility.json"
EPSILONS = (1.0, 3.0, 10.0)
# Chosen with a small sweep on seed 0 (rounds x local epochs in {1x20, 3x5, 10x2}, clip in
# {0.1, 0.3, 1}; the sweep itself is not accounted): one round of many local epochs needs
# the least noise per epsilon; a small clip keeps the model near its initialization.
FEDAVG = {"rounds": 1, "local_epochs": 20}
FEDAVG_CLIPS = (0.1, 1.0)
# adaptive clipping adapts between rounds: the demo job's schedule, fixed and adaptive alike
MULTI = {"rounds": 10, "local_epochs": 2}
ADAPTIVE_STARTS = (1.0, 0.1)
SGD = {"rounds": 3, "local_epochs": 2, "trim": 0.0}
SGD_CLIP = 1.0
SUM_EPSILONS = (0.5, 1.0, 3.0)
SUM_REPEATS = 5
SUM_TARGET_FPR = 0.05


def _setup():
    from datasites.harness.demo import BUNDLED_LABEL, BUNDLED_TABLE, DemoConfig, partition
    from datasites.runtime.tables import infer_schema, make_mock, read_table

    frame = read_table(BUNDLED_TABLE)
    schema = infer_schema(frame, BUNDLED_LABEL)
    splits = partition(frame, schema, DemoConfig())
    mocks = [make_mock(train, schema, 500, seed=i)  # seeded: a reproducible benchmark
             for i, (train, _) in enumerate(splits)]
    return schema, splits, mocks


def _sites(spec, splits, mocks):
    from fed_tasks.local import LocalSite
    from fed_tasks.preprocessing import Moments

    class MockStatsSite(LocalSite):
        """A DP job's statistics come from the site's published mock, as at a datasite."""

        def __init__(self, name, spec, train, test, mock):
            super().__init__(name, spec, train, test)
            self.mock = mock

        def step(self, action, given):
            if action == "stats" and self.spec.dp_enabled:
                x = self.mock.loc[:, list(self.spec.features)].to_numpy(np.float64)
                return {"vector": Moments.of(x).to_vector()}
            return super().step(action, given)

    return [MockStatsSite(f"site-{i + 1}", spec, tr, te, m)
            for i, ((tr, te), m) in enumerate(zip(splits, mocks, strict=True))]


def _pooled(result, splits, schema) -> dict[str, float]:
    from datasites.harness.demo import _pooled

    return _pooled(result, [te for _, te in splits], schema)


def _run(schema, splits, mocks, **spec_kw) -> dict[str, Any]:
    from fed_tasks.aggregation import PlainSum
    from fed_tasks.orchestrator import FederatedTrainer
    from fed_tasks.spec import JobSpec

    spec = JobSpec(features=schema.features, label_column=schema.label, min_sites=3, **spec_kw)
    started = time.perf_counter()
    trainer = FederatedTrainer(spec, _sites(spec, splits, mocks), progress=False,
                               secure_sum=PlainSum(3))
    result = trainer.fit()
    out = {**_pooled(result, splits, schema), "seconds": time.perf_counter() - started}
    if spec.dp_adaptive_clip:  # C_T: the clip the released counts led every party to
        from fed_tasks.dp_step import round_clip

        assert result.state is not None
        out["final_clip"] = round_clip(spec, result.state.server)
    return out


def _repeat(n: int, schema, splits, mocks, **spec_kw) -> tuple[list[dict[str, Any]], int]:
    """``n`` runs of one DP cell, and how many diverged: a site whose noisy model trained into
    NaN refuses to release it, so that run has no model; it is counted, never averaged."""
    from privacy.dp import NonFiniteUpdateError

    runs, diverged = [], 0
    for _ in range(n):
        try:
            runs.append(_run(schema, splits, mocks, **spec_kw))
        except NonFiniteUpdateError:
            diverged += 1
    return runs, diverged


def _untrained(schema, splits, mocks) -> dict[str, Any]:
    """The initial autoencoder, scaled by the public mock statistics: the floor."""
    from fed_tasks.orchestrator import FederatedTrainer, TrainingResult
    from fed_tasks.site_step import new_model
    from fed_tasks.spec import JobSpec

    spec = JobSpec(features=schema.features, label_column=schema.label, dp_epsilon=1.0)
    norm = FederatedTrainer(spec, _sites(spec, splits, mocks), progress=False).standardizer()
    result = TrainingResult(spec, new_model(spec).get_weights(), norm)
    return _pooled(result, splits, schema)


def _run_sums(schema, splits, mocks, **spec_kw) -> dict[str, Any]:
    """A pca/hbos job: pooled metrics, and the share of all training rows above the
    calibrated threshold (its target: ``SUM_TARGET_FPR``)."""
    import pandas as pd

    from fed_tasks.aggregation import PlainSum
    from fed_tasks.orchestrator import FederatedTrainer
    from fed_tasks.spec import JobSpec

    spec = JobSpec(features=schema.features, label_column=schema.label, min_sites=3,
                   target_fpr=SUM_TARGET_FPR, **spec_kw)
    started = time.perf_counter()
    result = FederatedTrainer(spec, _sites(spec, splits, mocks), progress=False,
                              secure_sum=PlainSum(3)).fit()
    seconds = time.perf_counter() - started
    train = pd.concat([tr for tr, _ in splits]).loc[:, list(schema.features)].to_numpy()
    above = float(np.mean(result.score_samples(train) > result.threshold))
    return {**_pooled(result, splits, schema), "seconds": seconds, "train_alarm_rate": above}


def _norm_floor(schema, splits, mocks) -> dict[str, Any]:
    """‖z‖² of the row standardized by the public mocks: pca with identity covariance."""
    from datasites.harness.demo import _pooled as pooled
    from fed_tasks.orchestrator import FederatedTrainer
    from fed_tasks.spec import JobSpec

    norm_spec = JobSpec(features=schema.features, label_column=schema.label, dp_epsilon=1.0)
    norm = FederatedTrainer(norm_spec, _sites(norm_spec, splits, mocks),
                            progress=False).standardizer()

    class Distance:
        threshold = None
        spec = norm_spec  # rows in the table's order (no time column): what _pooled reads

        def score_samples(self, x):
            return np.sum(norm.transform(x) ** 2, axis=1)

    return pooled(Distance(), [te for _, te in splits], schema)


def _sum_rows(schema, splits, mocks) -> list[dict[str, Any]]:
    from fed_tasks import dp_sums
    from fed_tasks.spec import JobSpec

    rows = [{"mode": "distance ||z||^2 to the mock mean (floor)", "epsilon": 0.0,
             "repeats": 1, **_norm_floor(schema, splits, mocks)}]
    for model in ("pca", "hbos"):
        rows.append(_sum_row(f"{model}, no DP", math.inf,
                             [_run_sums(schema, splits, mocks, model=model)]))
        for agg, label in (("plain", "each site adds all noise"),
                           ("paillier", "secure sum, noise shared by 3")):
            for eps in SUM_EPSILONS:
                kw = {"model": model, "dp_epsilon": eps, "aggregation": agg}
                runs = [_run_sums(schema, splits, mocks, **kw) for _ in range(SUM_REPEATS)]
                spec = JobSpec(features=schema.features, min_sites=3,
                               target_fpr=SUM_TARGET_FPR, **kw)
                rows.append(_sum_row(f"{model}, DP per row, {label}", eps, runs,
                                     noise_multiplier=dp_sums.noise_multiplier(spec),
                                     releases=dp_sums.releases(spec)))
                print(rows[-1], flush=True)
    return rows


def _sum_row(mode: str, epsilon: float, runs: list[dict], **info) -> dict[str, Any]:
    row = _row(mode, epsilon, runs, **info)
    for key in ("f1", "train_alarm_rate"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row |= {key: float(np.mean(values)), f"{key}_min": min(values),
                    f"{key}_max": max(values)}
    return row


def _row(mode: str, epsilon: float | None, runs: list[dict], **info) -> dict[str, Any]:
    if not runs:
        return {"mode": mode, "epsilon": epsilon, **info, "repeats": 0}
    roc = [r["roc_auc"] for r in runs]
    pr = [r["pr_auc"] for r in runs]
    row = {"mode": mode, "epsilon": epsilon, **info, "repeats": len(runs),
           "roc_auc": float(np.mean(roc)), "roc_auc_min": min(roc), "roc_auc_max": max(roc),
           "pr_auc": float(np.mean(pr)), "pr_auc_min": min(pr), "pr_auc_max": max(pr),
           "seconds_per_run": float(np.mean([r.get("seconds", 0.0) for r in runs]))}
    clips = [r["final_clip"] for r in runs if "final_clip" in r]
    if clips:  # geometric mean: the clip moves by factors
        row |= {"final_clip": float(np.exp(np.mean(np.log(clips)))),
                "final_clip_min": min(clips), "final_clip_max": max(clips)}
    return row


def _syft_dp_sgd(schema, splits, epsilon: float) -> dict[str, Any]:
    """One DP-SGD job through real datasites: the model, and what the ledgers charged."""
    from datasites.harness.federation import Federation
    from fed_tasks.spec import JobSpec

    spec = JobSpec(features=schema.features, label_column=schema.label, dp_epsilon=epsilon,
                   dp_sgd=True, dp_clip=SGD_CLIP, min_sites=2, **SGD)
    started = time.perf_counter()
    with Federation.start(splits, schema, key_authority=False) as fed:
        fed.approve_all(fed.submit(spec))
        result = fed.trainer(spec, progress=False).fit()
        charged = {s.name: s.guard.privacy.job_epsilon(spec.job_id) for s in fed.sites}
    return {**_pooled(result, splits, schema), "seconds": time.perf_counter() - started,
            "epsilon_charged_per_site": charged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per DP cell")
    parser.add_argument("--syft", action="store_true", help="add one DP-SGD run via syft")
    parser.add_argument("--sums-only", action="store_true",
                        help="only the pca/hbos rows, replaced in an existing results file")
    args = parser.parse_args()

    from fed_tasks import dp_step
    from fed_tasks.spec import JobSpec

    schema, splits, mocks = _setup()
    sum_rows = _sum_rows(schema, splits, mocks)
    if args.sums_only:
        report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        report["sum_detector_rows"] = sum_rows
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2, default=str))
        _print_sums(sum_rows)
        print(f"written to {RESULTS}")
        return
    rows = [{"mode": "untrained autoencoder (floor)", "epsilon": 0.0, "repeats": 1,
             **_untrained(schema, splits, mocks)}]
    base = _run(schema, splits, mocks, rounds=10)
    rows.append(_row("FedAvg, demo job (10 rounds x 2 epochs)", math.inf, [base]))
    print(f"baseline done: {base}", flush=True)
    feats = schema.features
    rows.append(_row("FedAvg, DP-FedAvg's schedule", math.inf,
                     [_run(schema, splits, mocks, **FEDAVG)], **FEDAVG))
    variants = [("paillier", clip, "DP-FedAvg, secure sum (noise shared by 3)")
                for clip in FEDAVG_CLIPS]
    variants.append(("plain", FEDAVG_CLIPS[0], "DP-FedAvg, plain (each site adds all noise)"))
    for agg, clip, label in variants:
        for eps in EPSILONS:
            kw = {**FEDAVG, "dp_epsilon": eps, "dp_clip": clip, "aggregation": agg}
            runs, diverged = _repeat(args.repeats, schema, splits, mocks, **kw)
            z = dp_step.client_plan(JobSpec(features=feats, min_sites=3, **kw)).noise_multiplier
            rows.append(_row(label, eps, runs, clip=clip, noise_multiplier=z, diverged=diverged,
                             **FEDAVG))
            print(rows[-1], flush=True)
    for start in ADAPTIVE_STARTS:
        for adaptive in (False, True):
            for eps in EPSILONS:
                kw = {**MULTI, "dp_epsilon": eps, "dp_clip": start, "aggregation": "paillier",
                      "dp_adaptive_clip": adaptive}
                spec = JobSpec(features=feats, min_sites=3, **kw)
                runs, diverged = _repeat(args.repeats, schema, splits, mocks, **kw)
                info: dict[str, Any] = {"clip": start, "adaptive": adaptive, **MULTI,
                                        "diverged": diverged,
                                        "noise_multiplier": dp_step.client_plan(spec)
                                        .noise_multiplier}
                rule = dp_step.adaptive_clip(spec)
                if rule is not None:
                    info |= {"update_noise_multiplier": rule.update_noise_multiplier,
                             "count_std": rule.count_std, "clip_quantile": rule.quantile,
                             "clip_lr": rule.lr}
                label = ("DP-FedAvg, secure sum, 10 rounds, "
                         + ("adaptive clip" if adaptive else "fixed clip"))
                rows.append(_row(label, eps, runs, **info))
                print(rows[-1], flush=True)
    rows.append(_row("FedAvg, DP-SGD's schedule (no trim)", math.inf,
                     [_run(schema, splits, mocks, **SGD)], **SGD))
    for eps in EPSILONS:
        kw = {**SGD, "dp_epsilon": eps, "dp_sgd": True, "dp_clip": SGD_CLIP}
        runs, diverged = _repeat(args.repeats, schema, splits, mocks, **kw)
        spec = JobSpec(features=feats, **kw)
        zs = [dp_step.sgd_plan(spec, len(tr)).noise_multiplier for tr, _ in splits]
        rows.append(_row("DP-SGD (per row), plain", eps, runs, clip=SGD_CLIP,
                         noise_multiplier=zs, diverged=diverged, **SGD))
        print(rows[-1], flush=True)
    syft = _syft_dp_sgd(schema, splits, 3.0) if args.syft else None
    report = {"data": "ODDS shuttle, 3 non-IID sites (demo split, seed 0)", "delta": 1e-5,
              "rows": rows, "syft_dp_sgd_epsilon_3": syft, "sum_detector_rows": sum_rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, default=str))
    _print_sums(sum_rows)
    _print(rows, syft)


def _print_sums(rows: list[dict]) -> None:
    def cell(r, key, digits=3):
        if r.get(key) is None:
            return "-"
        mean = f"{r[key]:.{digits}f}"
        if f"{key}_min" not in r or r.get("repeats", 1) < 2:
            return mean
        return f"{mean} [{r[f'{key}_min']:.{digits}f},{r[f'{key}_max']:.{digits}f}]"

    print(f"\n{'detector built from sums':<48} {'eps':>4} {'z':>6}  {'ROC-AUC':>21}  "
          f"{'PR-AUC':>21}  {'F1':>21}  {'train alarm rate':>21}")
    for r in rows:
        eps = "inf" if r["epsilon"] == math.inf else ("-" if r["epsilon"] == 0 else
                                                      f"{r['epsilon']:g}")
        z = r.get("noise_multiplier")
        print(f"{r['mode']:<48} {eps:>4} {'-' if z is None else f'{z:.3g}':>6}  "
              f"{cell(r, 'roc_auc'):>21}  {cell(r, 'pr_auc'):>21}  {cell(r, 'f1'):>21}  "
              f"{cell(r, 'train_alarm_rate', 4):>21}")


def _print(rows: list[dict], syft: dict | None) -> None:
    def eps(v):
        return "inf" if v == math.inf else ("-" if v == 0 else f"{v:g}")

    print(f"\n{'mode':<52} {'eps':>4} {'clip':>9} {'z':>11}  {'ROC-AUC mean [min,max]':>24}"
          f"  {'PR-AUC mean [min,max]':>24}")
    for r in rows:
        if not r.get("repeats", 1):
            print(f"{r['mode']:<52} {eps(r['epsilon']):>4}  every run diverged")
            continue
        z = r.get("noise_multiplier")
        zs = ("-" if z is None else f"{z:.3g}" if not isinstance(z, list)
              else "/".join(f"{v:.2g}" for v in z))
        clip = r.get("clip")
        if "final_clip" in r:
            clip = f"{clip:g}>{r['final_clip']:.2g}"
        roc = (f"{r['roc_auc']:.3f} [{r.get('roc_auc_min', r['roc_auc']):.3f},"
               f"{r.get('roc_auc_max', r['roc_auc']):.3f}]")
        pr = (f"{r['pr_auc']:.3f} [{r.get('pr_auc_min', r['pr_auc']):.3f},"
              f"{r.get('pr_auc_max', r['pr_auc']):.3f}]")
        gone = f"  ({r['diverged']} diverged)" if r.get("diverged") else ""
        print(f"{r['mode']:<52} {eps(r['epsilon']):>4} {'-' if clip is None else clip:>9} "
              f"{zs:>11}  {roc:>24}  {pr:>24}{gone}")
    if syft:
        print(f"syft DP-SGD eps=3: ROC-AUC {syft['roc_auc']:.3f} PR-AUC {syft['pr_auc']:.3f}, "
              f"ledgers charged {syft['epsilon_charged_per_site']}, {syft['seconds']:.0f} s")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
