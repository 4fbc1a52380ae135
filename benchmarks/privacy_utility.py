"""What differential privacy costs in detection quality on the demo's 3 non-IID sites.

Pooled ROC-AUC / PR-AUC (union of the sites' private test splits) of the released model at
epsilon in {1, 3, 10, inf}, for client-level DP-FedAvg and for sample-level DP-SGD, with the
non-private federated model and the *untrained* autoencoder as baselines in the same run.

Sites are the in-memory :class:`fed_tasks.local.LocalSite` running the same site step as a
datasite (clipping, noise, unit weight, loss withheld), with the datasite's rule that a DP
job's feature scaling comes from the published mocks. Secure aggregation returns the same
sum as adding the vectors in clear (up to fixed-point rounding, tested elsewhere), so
"secure" rows add each site's 1/3 noise share and sum in clear. DP noise is seeded from
``secrets`` (as at a real site), so every DP configuration is repeated and the mean and
range are reported. ``--syft`` adds one DP-SGD job through real PySyft datasites.

Usage: ``python benchmarks/privacy_utility.py [--repeats 3] [--syft]``; prints a table and
writes ``benchmarks/results/privacy_utility.json``.
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
SGD = {"rounds": 3, "local_epochs": 2, "trim": 0.0}
SGD_CLIP = 1.0


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
    return {**_pooled(result, splits, schema), "seconds": time.perf_counter() - started}


def _untrained(schema, splits, mocks) -> dict[str, Any]:
    """The initial autoencoder, scaled by the public mock statistics: the floor."""
    from fed_tasks.orchestrator import FederatedTrainer, TrainingResult
    from fed_tasks.site_step import new_model
    from fed_tasks.spec import JobSpec

    spec = JobSpec(features=schema.features, label_column=schema.label, dp_epsilon=1.0)
    norm = FederatedTrainer(spec, _sites(spec, splits, mocks), progress=False).standardizer()
    result = TrainingResult(spec, new_model(spec).get_weights(), norm)
    return _pooled(result, splits, schema)


def _row(mode: str, epsilon: float | None, runs: list[dict], **info) -> dict[str, Any]:
    roc = [r["roc_auc"] for r in runs]
    pr = [r["pr_auc"] for r in runs]
    return {"mode": mode, "epsilon": epsilon, **info, "repeats": len(runs),
            "roc_auc": float(np.mean(roc)), "roc_auc_min": min(roc), "roc_auc_max": max(roc),
            "pr_auc": float(np.mean(pr)), "pr_auc_min": min(pr), "pr_auc_max": max(pr),
            "seconds_per_run": float(np.mean([r.get("seconds", 0.0) for r in runs]))}


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syft", action="store_true", help="add one DP-SGD run via syft")
    args = parser.parse_args()

    from fed_tasks import dp_step
    from fed_tasks.spec import JobSpec

    schema, splits, mocks = _setup()
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
            runs = [_run(schema, splits, mocks, **kw) for _ in range(args.repeats)]
            z = dp_step.client_plan(JobSpec(features=feats, min_sites=3, **kw)).noise_multiplier
            rows.append(_row(label, eps, runs, clip=clip, noise_multiplier=z, **FEDAVG))
            print(rows[-1], flush=True)
    rows.append(_row("FedAvg, DP-SGD's schedule (no trim)", math.inf,
                     [_run(schema, splits, mocks, **SGD)], **SGD))
    for eps in EPSILONS:
        kw = {**SGD, "dp_epsilon": eps, "dp_sgd": True, "dp_clip": SGD_CLIP}
        runs = [_run(schema, splits, mocks, **kw) for _ in range(max(1, args.repeats - 1))]
        spec = JobSpec(features=feats, **kw)
        zs = [dp_step.sgd_plan(spec, len(tr)).noise_multiplier for tr, _ in splits]
        rows.append(_row("DP-SGD (per row), plain", eps, runs, clip=SGD_CLIP,
                         noise_multiplier=zs, **SGD))
        print(rows[-1], flush=True)
    syft = _syft_dp_sgd(schema, splits, 3.0) if args.syft else None
    report = {"data": "ODDS shuttle, 3 non-IID sites (demo split, seed 0)", "delta": 1e-5,
              "rows": rows, "syft_dp_sgd_epsilon_3": syft}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, default=str))
    _print(rows, syft)


def _print(rows: list[dict], syft: dict | None) -> None:
    def eps(v):
        return "inf" if v == math.inf else ("-" if v == 0 else f"{v:g}")

    print(f"\n{'mode':<46} {'eps':>4} {'clip':>5} {'z':>11}  {'ROC-AUC mean [min,max]':>24}"
          f"  {'PR-AUC mean [min,max]':>24}")
    for r in rows:
        z = r.get("noise_multiplier")
        zs = ("-" if z is None else f"{z:.3g}" if not isinstance(z, list)
              else "/".join(f"{v:.2g}" for v in z))
        clip = r.get("clip")
        roc = (f"{r['roc_auc']:.3f} [{r.get('roc_auc_min', r['roc_auc']):.3f},"
               f"{r.get('roc_auc_max', r['roc_auc']):.3f}]")
        pr = (f"{r['pr_auc']:.3f} [{r.get('pr_auc_min', r['pr_auc']):.3f},"
              f"{r.get('pr_auc_max', r['pr_auc']):.3f}]")
        print(f"{r['mode']:<46} {eps(r['epsilon']):>4} {'-' if clip is None else clip:>5} "
              f"{zs:>11}  {roc:>24}  {pr:>24}")
    if syft:
        print(f"syft DP-SGD eps=3: ROC-AUC {syft['roc_auc']:.3f} PR-AUC {syft['pr_auc']:.3f}, "
              f"ledgers charged {syft['epsilon_charged_per_site']}, {syft['seconds']:.0f} s")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
