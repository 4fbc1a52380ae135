"""The end-to-end job behind ``fedsyft demo`` and ``make demo``.

The harness plays every role: it splits one public table into non-IID institutions (so it
holds all the rows, which is why it may also compute reference models), provisions one
PySyft datasite per institution, submits the data scientist's job, has each data owner
review and approve it, runs the rounds, and gathers the sites' own metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datasites.harness.partition import dirichlet_split, train_test_split
from datasites.runtime.tables import FederationSchema, TableError, infer_schema, read_table
from fed_tasks.evaluation import detection_metrics
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer, TrainingResult
from fed_tasks.spec import JobSpec

BUNDLED_TABLE = Path(__file__).parents[1] / "data" / "shuttle.csv.gz"
BUNDLED_LABEL = "anomaly"


@dataclass(frozen=True)
class DemoConfig:
    data: Path = BUNDLED_TABLE
    label_column: str = BUNDLED_LABEL
    sites: int = 3
    rounds: int = 10
    model: str = "ae"
    aggregation: str = "plain"
    seed: int = 0
    split_by: str | None = None
    alpha: float = 0.5
    test_fraction: float = 0.3
    progress: bool = True
    keep_sites: Path | None = None  # site directories survive the run (for `fedsyft requests`)
    epsilon: float | None = None  # DP budget of the job (None: no DP)
    delta: float = 1e-5
    clip: float = 1.0  # L2 bound of a site's update (DP-FedAvg) or of a row's gradient (DP-SGD)
    dp_sgd: bool = False  # sample-level DP-SGD instead of client-level DP-FedAvg
    # site name -> {"owner": ..., "officer": ...}; never part of the report
    passwords: dict[str, dict[str, str]] | None = field(default=None, repr=False)


def partition(frame: pd.DataFrame, schema: FederationSchema, cfg: DemoConfig
              ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Non-IID institutions, each with its own stratified test split."""
    by = cfg.split_by or schema.features[0]
    if by not in schema.features:
        raise TableError(f"split column {by!r} is not a feature column")
    parts = dirichlet_split(frame, cfg.sites, by=by, alpha=cfg.alpha, seed=cfg.seed)
    splits = [train_test_split(p, cfg.test_fraction, seed=cfg.seed + i, label=schema.label)
              for i, p in enumerate(parts)]
    for i, (_, test) in enumerate(splits):
        if schema.label and test[schema.label].nunique() < 2:
            raise TableError(f"site {i + 1}'s test split has only one class; use fewer sites "
                             "or a larger --alpha")
    return splits


def _pooled(result: TrainingResult, tests: list[pd.DataFrame], schema: FederationSchema
            ) -> dict[str, float]:
    union = pd.concat(tests, ignore_index=True)
    scores = result.score_samples(union.loc[:, list(schema.features)].to_numpy(np.float64))
    return detection_metrics(union[schema.label].to_numpy(), scores)


def _train_local(spec: JobSpec, sites: list[LocalSite]) -> tuple[TrainingResult, list[dict]]:
    trainer = FederatedTrainer(spec, sites, progress=False)
    result = trainer.fit()
    return result, trainer.evaluate(result)


def reference_models(spec: JobSpec, splits: list[tuple[pd.DataFrame, pd.DataFrame]],
                     schema: FederationSchema, names: list[str]) -> dict[str, Any]:
    """Centralized (union of train splits) and each-site-alone models, same budget."""
    spec = JobSpec.model_validate({**spec.model_dump(), "aggregation": "plain", "min_sites": 1,
                                   "dp_epsilon": None, "dp_sgd": False})  # non-private bounds
    tests = [t for _, t in splits]
    union_train = pd.concat([tr for tr, _ in splits], ignore_index=True)
    central, _ = _train_local(spec, [LocalSite("central", spec, union_train, tests[0])])
    central_sites = [{"site": n, **_site_metrics(central, t, schema)}
                     for n, t in zip(names, tests, strict=True)]
    local_rows = []
    for name, (train, test) in zip(names, splits, strict=True):
        alone, metrics = _train_local(spec, [LocalSite(name, spec, train, test)])
        local_rows.append({"site": name, **metrics[0], "pooled": _pooled(alone, tests, schema)})
    return {
        "centralized": {**_pooled(central, tests, schema), "per_site": central_sites},
        "local_only": {
            "roc_auc": float(np.mean([r["pooled"]["roc_auc"] for r in local_rows])),
            "pr_auc": float(np.mean([r["pooled"]["pr_auc"] for r in local_rows])),
            "per_site": local_rows,
        },
    }


def _site_metrics(result: TrainingResult, test: pd.DataFrame, schema: FederationSchema
                  ) -> dict[str, float]:
    return _pooled(result, [test], schema)


def privacy_report(spec: JobSpec, sites: list[Any], rounds_run: int) -> dict[str, Any]:
    """What the job cost in privacy, from the sites' own ledgers.

    ``epsilon_spent`` is the largest epsilon any site's ledger charged this job (each site
    charges its own dataset; with DP-SGD sites differ by row count); it equals the
    accountant's figure for the rounds that ran unless a round was retried (then it is
    higher). ``epsilon_accountant`` is that figure for client-level DP. Without DP both are
    null: the releases have no finite epsilon.
    """
    if not spec.dp_enabled:
        return {"dp": None, "epsilon_spent": None, "delta": None}
    from fed_tasks.dp_step import cumulative_epsilon, noise_multiplier

    spent = max(s.guard.privacy.job_epsilon(spec.job_id) for s in sites)
    return {
        "dp": "dp_sgd" if spec.dp_sgd else "dp_fedavg",
        "epsilon_spent": spent,
        "delta": spec.dp_delta,
        "epsilon_target": spec.dp_epsilon,
        "epsilon_accountant": None if spec.dp_sgd else cumulative_epsilon(spec, rounds_run),
        "noise_multiplier": noise_multiplier(spec),
        "clip": spec.dp_clip,
        "epsilon_spent_per_site": {s.name: s.guard.privacy.job_epsilon(spec.job_id)
                                   for s in sites},
    }


class JobRefusedError(ValueError):
    """The job would fail at the sites (policy, encoding, seed): found before provisioning."""


def preflight(spec: JobSpec, splits: list[tuple[pd.DataFrame, pd.DataFrame]],
              names: list[str]) -> None:
    """Check the whole job against the tables and a new site's policy before any site is
    provisioned, so that a job the sites must refuse costs seconds, not a federation.

    Checked: the default :class:`DatasetPolicy` (rounds, model, DP, delta, and an epsilon
    above a fresh dataset's budget), the seeds torch is given (site model and training), and
    that each site's statistics fit the fixed-point encoding they are summed in.
    """
    import torch

    from datasites.governance.policy import DatasetPolicy
    from fed_tasks.encoding import STATS_CODEC
    from fed_tasks.site_step import new_model, stats

    policy = DatasetPolicy()
    problems = policy.violations(spec, remaining=policy.epsilon_budget)
    if problems:
        raise JobRefusedError("the sites' default policy would refuse the job: "
                              + "; ".join(problems))
    try:
        new_model(spec)
        torch.Generator().manual_seed(spec.seed * 100_003 + spec.rounds)
    except (RuntimeError, OverflowError, ValueError):
        raise JobRefusedError(f"--seed {spec.seed} is out of range (0 to "
                              f"{(2**64 - 1 - spec.rounds) // 100_003})") from None
    for name, (train, _) in zip(names, splits, strict=True):
        try:
            STATS_CODEC.encode(stats(spec, train)["vector"])
        except ValueError:
            raise JobRefusedError(
                f"{name}'s values are too large for the secure sum of the column statistics "
                f"(a sum of squares above {STATS_CODEC.bound:g}); rescale the table") from None


def run_demo(cfg: DemoConfig, log: Any = print) -> dict[str, Any]:
    """Run the whole job; returns the report (see the README for its fields)."""
    started = time.perf_counter()
    frame = read_table(cfg.data)
    if cfg.label_column not in frame.columns:
        raise TableError(f"label column {cfg.label_column!r} not in {cfg.data}; columns are "
                         f"{list(frame.columns)}")
    schema = infer_schema(frame, cfg.label_column)
    splits = partition(frame, schema, cfg)
    names = [f"site-{i + 1}" for i in range(cfg.sites)]
    dp: dict[str, Any] = {}
    if cfg.epsilon is not None:
        dp = {"dp_epsilon": cfg.epsilon, "dp_delta": cfg.delta, "dp_clip": cfg.clip,
              "dp_sgd": cfg.dp_sgd, **({"trim": 0.0} if cfg.dp_sgd else {})}
    spec = JobSpec(model=cfg.model, features=schema.features, label_column=schema.label,
                   rounds=cfg.rounds, seed=cfg.seed, aggregation=cfg.aggregation,
                   min_sites=min(2, cfg.sites), **dp)
    log(f"{len(frame):,} rows, {schema.describe()}; {cfg.sites} sites "
        f"(rows {[len(tr) + len(te) for tr, te in splits]})")
    preflight(spec, splits, names)  # what would fail after provisioning fails here instead
    from datasites.harness.federation import Federation  # imports syft (~10 s): after input checks

    t0 = time.perf_counter()
    with Federation.start(splits, schema, names=names, root=cfg.keep_sites,
                          passwords=cfg.passwords,
                          key_authority=cfg.aggregation == "paillier") as fed:
        provision_s = time.perf_counter() - t0
        log(f"provisioned {cfg.sites} datasites in {provision_s:.1f} s; "
            f"submitting job {spec.job_id}")
        requests = fed.submit(spec)
        for name, rid in requests.items():
            review = fed.site(name).review(rid)
            log(review.plain_words().splitlines()[0] + " -> approved by its data owner")
            fed.site(name).approve(rid)
        trainer = fed.trainer(spec, progress=cfg.progress)
        t1 = time.perf_counter()
        result = trainer.fit()
        train_s = time.perf_counter() - t1
        if result.stopped_early:
            log(f"stopped after {result.rounds_completed} of {spec.rounds} rounds: "
                f"{result.stop_reason}")
        per_site = trainer.evaluate(result)
        privacy = privacy_report(spec, [fed.site(n) for n in names], result.rounds_completed)
    federated = _pooled(result, [t for _, t in splits], schema)
    log("training reference models (centralized, each site alone) ...")
    refs = reference_models(spec, splits, schema, names)
    return {
        "job_id": spec.job_id,
        "data": str(cfg.data),
        "sites": cfg.sites,
        "rounds": cfg.rounds,
        "model": cfg.model,
        "seed": cfg.seed,
        "aggregation": spec.aggregation,
        "federated": {**federated, "losses": [None if np.isnan(v) else v for v in result.losses]},
        **privacy,
        "rounds_completed": result.rounds_completed,
        "stopped_early": result.stop_reason or None,
        **refs,
        "per_site": per_site,
        "site_rows": [{"site": n, "train": len(tr), "test": len(te),
                       "test_anomalies": int(te[schema.label].sum())}
                      for n, (tr, te) in zip(names, splits, strict=True)],
        "timing": {"provision_s": provision_s, "train_s": train_s,
                   "round_s": result.round_seconds},
        "seconds": time.perf_counter() - started,
    }
