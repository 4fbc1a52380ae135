"""The end-to-end job behind ``fedsyft demo`` and ``make demo``.

The harness plays every role: it splits one public table into non-IID institutions, or takes
one table per institution (either way it holds all the rows, which is why it may also compute
reference models), provisions one PySyft datasite per institution, submits the data
scientist's job, has each data owner review and approve it, runs the rounds, and gathers the
sites' own metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datasites.cli.job_options import DEFAULT_ROUNDS, DP_SGD_ROUNDS
from datasites.harness.partition import (
    MIN_ROWS_PER_SITE,
    SERIES_MIN_ROWS,
    contiguous_split,
    dirichlet_split,
    train_test_split,
)
from datasites.runtime.tables import (
    FederationSchema,
    SchemaResult,
    TableError,
    check_time_role,
    inspect_tables,
    read_table,
)
from fed_tasks import dp_usefulness
from fed_tasks.evaluation import noise_check
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer, TrainingResult
from fed_tasks.site_step import in_order, scored
from fed_tasks.spec import INDIVIDUAL_STRATEGIES, ROW_DP_MODELS, SERIES_MODELS, JobSpec

BUNDLED_TABLE = Path(__file__).parents[1] / "data" / "shuttle.csv.gz"
BUNDLED_LABEL = "anomaly"
#: why a series job has no centralized reference model
NO_CENTRAL_SERIES = ("not applicable to series: concatenating the devices' series into one "
                     "would invent transitions between devices that never happened")


@dataclass(frozen=True)
class DemoConfig:
    # one table: split into `sites` non-IID institutions; k >= 2 tables: one site each
    data: tuple[Path, ...] = (BUNDLED_TABLE,)
    label_column: str = BUNDLED_LABEL
    # a series job (model lstm-ae): one file is cut into `sites` consecutive segments, k
    # files are k devices; each site is evaluated on its whole series (no split, no shuffle)
    time_column: str | None = None
    sites: int = 3
    # at most (training stops earlier once the loss stops improving); None: DEFAULT_ROUNDS,
    # or DP_SGD_ROUNDS for a job trained with DP-SGD (see datasites/cli/job_options.py)
    rounds: int | None = None
    model: str = "ae"
    drop_columns: tuple[str, ...] = ()  # left out of the schema (e.g. categorical columns)
    target_fpr: float | None = 0.05  # alarm threshold: this share of training rows above it
    patience: int = 0  # early stopping (neural models): rounds without improvement
    strategy: str = "fedavg"  # how rounds are combined (fed_tasks/strategies)
    personalize_epochs: int = 0  # each site fine-tunes its own copy after the rounds
    fraction: float = 1.0  # of the sites each training round calls (a seeded draw)
    round_timeout: float | None = None  # seconds a round waits for a site (None: all)
    async_k: int | None = None  # buffered rounds: aggregate once this many sites answered
    compress: str = "none"  # training updates: none, q8, q16, topk:K (fed_tasks/compression)
    min_delta: float = 0.01  # relative loss improvement that counts as one
    min_local_steps: int = 20  # minibatch steps per site and round, at least
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
    # what epsilon protects: "row" (DP-SGD; pca/hbos always), "site" (DP-FedAvg), or None:
    # site-level unless its noise would swamp the signal (fed_tasks.dp_usefulness.default_unit)
    dp_unit: str | None = None
    adaptive_clip: bool = False  # client-level DP: the clip follows the update norms
    # site name -> {"owner": ..., "officer": ...}; never part of the report
    passwords: dict[str, dict[str, str]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # one path is accepted too (benchmarks and scripts pass a single table)
        data = (self.data,) if isinstance(self.data, (str, Path)) else self.data
        object.__setattr__(self, "data", tuple(Path(d) for d in data))
        object.__setattr__(self, "drop_columns", tuple(self.drop_columns))
        if not self.data:
            raise TableError("no input table")
        if len(self.data) > 1 and self.sites != len(self.data):
            raise TableError(f"--sites {self.sites} does not match the {len(self.data)} --data "
                             "files (one site per file); leave --sites out")
        check_time_role(self.time_column, self.label_column, self.drop_columns)
        if self.time_column is not None and self.model not in SERIES_MODELS:
            raise TableError(f"--time-column orders the rows of a series model "
                             f"({', '.join(SERIES_MODELS)}); model {self.model!r} scores rows "
                             "independently: leave --time-column out")


def partition(frame: pd.DataFrame, schema: FederationSchema, cfg: DemoConfig
              ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Non-IID institutions, each with its own stratified test split."""
    by = cfg.split_by or schema.features[0]
    if by not in schema.features:
        raise TableError(f"split column {by!r} is not a feature column")
    parts = dirichlet_split(frame, cfg.sites, by=by, alpha=cfg.alpha, seed=cfg.seed)
    # a site whose test split has one class is fine: its own ROC-AUC is undefined ("-"),
    # the pooled one is not (load_tables checks the pooled test rows)
    return [train_test_split(p, cfg.test_fraction, seed=cfg.seed + i, label=schema.label)
            for i, p in enumerate(parts)]


def table_splits(frames: list[pd.DataFrame], schema: FederationSchema, cfg: DemoConfig
                 ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """One institution per table, no split across sites: each keeps its own stratified test
    split."""
    for path, frame in zip(cfg.data, frames, strict=True):
        if len(frame) < MIN_ROWS_PER_SITE:
            raise TableError(f"{path} has {len(frame)} rows, fewer than the {MIN_ROWS_PER_SITE} "
                             "a site needs")
    return [train_test_split(f.reset_index(drop=True), cfg.test_fraction, seed=cfg.seed + i,
                             label=schema.label) for i, f in enumerate(frames)]


def series_splits(frames: list[pd.DataFrame], cfg: DemoConfig
                  ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Series sites: one series cut into ``cfg.sites`` consecutive segments, or one device
    per file. Each site trains on its whole series and is evaluated on it too: training is
    unsupervised (the label never enters it) and anomalies sit anywhere in a series, so a
    held-out tail would leave most devices with none (NAB's convention: score the whole
    series, labels only at evaluation)."""
    if len(frames) == 1:
        parts = contiguous_split(frames[0], cfg.sites, SERIES_MIN_ROWS)
    else:
        for path, frame in zip(cfg.data, frames, strict=True):
            if len(frame) < SERIES_MIN_ROWS:
                raise TableError(f"{path} has {len(frame)} rows, fewer than the "
                                 f"{SERIES_MIN_ROWS} (two windows) a series site needs")
        parts = frames
    return [(p, p) for p in parts]


def load_tables(cfg: DemoConfig) -> tuple[SchemaResult, list[tuple[pd.DataFrame, pd.DataFrame]]]:
    """Read the input table(s), infer the schema over all of them together (constant
    columns: constant over the whole input) and cut the sites' train/test splits."""
    frames = [read_table(path, time_column=cfg.time_column) for path in cfg.data]
    found = inspect_tables(frames, cfg.label_column, cfg.drop_columns,
                           names=[str(p) for p in cfg.data], time=cfg.time_column)
    frames = [found.select(f) for f in frames]
    if cfg.time_column is not None:
        return found, series_splits(frames, cfg)
    splits = (partition(frames[0], found.schema, cfg) if len(frames) == 1
              else table_splits(frames, found.schema, cfg))
    label = found.schema.label
    if label and pd.concat([t[label] for _, t in splits]).nunique() < 2:
        raise TableError("the sites' test splits together hold only one class: the pooled "
                         "evaluation needs both normal (0) and anomalous (1) rows; use fewer "
                         "sites or more anomalous rows")
    return found, splits


def threshold_metrics(counts: dict[str, Any]) -> dict[str, float | None]:
    """Precision, recall and F1 at the alarm threshold from tp/fp/fn/tn (None: undefined,
    e.g. precision when nothing raised an alarm)."""
    tp, fp, fn = (int(counts[k]) for k in ("tp", "fp", "fn"))
    return {"precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None}


def _with_threshold_metrics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, **threshold_metrics(r)} if "tp" in r else r for r in rows]


def pooled_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Summed tp/fp/fn/tn over sites and the pooled precision, recall and F1 ({} when the
    sites report no counts: no threshold)."""
    if not rows or any("tp" not in r for r in rows):
        return {}
    counts = {k: sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn")}
    return {**counts, **threshold_metrics(counts)}


def _pooled(result: TrainingResult, tests: list[pd.DataFrame], schema: FederationSchema
            ) -> dict[str, Any]:
    """Metrics of ``result`` on the union of ``tests``, computed by the harness (which holds
    every row): ROC-AUC, PR-AUC (None with one class) and, with a threshold, the summed
    counts and P/R/F1.

    Each test split is scored by itself and the scores concatenated: for a row detector
    that is the union's scores; for a series model it is what each site's own evaluation
    computes (its series in time order, scaled by itself), never one invented series of all
    the devices' rows."""
    ordered = [in_order(result.spec, t) for t in tests]
    scores = np.concatenate([
        result.score_samples(t.loc[:, list(schema.features)].to_numpy(np.float64))
        for t in ordered])
    labels = np.concatenate([t[schema.label].to_numpy().astype(int) for t in ordered])
    metrics = scored(labels, scores, result.threshold)  # as each site's evaluation
    return {**metrics, **threshold_metrics(metrics)} if "tp" in metrics else metrics


def _train_local(spec: JobSpec, sites: list[LocalSite]) -> tuple[TrainingResult, list[dict]]:
    trainer = FederatedTrainer(spec, sites, progress=False)
    result = trainer.fit()
    return result, trainer.evaluate(result)


def reference_models(spec: JobSpec, splits: list[tuple[pd.DataFrame, pd.DataFrame]],
                     schema: FederationSchema, names: list[str]) -> dict[str, Any]:
    """Centralized (union of train splits) and each-site-alone models, same budget.

    A series job has no centralized model (``None``, see ``NO_CENTRAL_SERIES``): one series
    made of every device's rows would be a series that never existed."""
    # non-private bounds; one site: a robust strategy of one update is that update
    alone_strategy = "fedavg" if spec.strategy in INDIVIDUAL_STRATEGIES else spec.strategy
    # (one site: nothing to buffer, nothing to wait for; no DP, so no adaptive clip)
    spec = JobSpec.model_validate({**spec.model_dump(), "aggregation": "plain", "min_sites": 1,
                                   "dp_epsilon": None, "dp_sgd": False,
                                   "dp_adaptive_clip": False, "dp_clip_count_std": None,
                                   "async_k": None, "strategy": alone_strategy})
    tests = [t for _, t in splits]
    centralized: dict[str, Any] | None = None
    if schema.time is None:
        union_train = pd.concat([tr for tr, _ in splits], ignore_index=True)
        central, _ = _train_local(spec, [LocalSite("central", spec, union_train, tests[0])])
        central_sites = [{"site": n, **_site_metrics(central, t, schema)}
                         for n, t in zip(names, tests, strict=True)]
        centralized = {**_pooled(central, tests, schema), "per_site": central_sites}
    local_rows = []
    for name, (train, test) in zip(names, splits, strict=True):
        alone, metrics = _train_local(spec, [LocalSite(name, spec, train, test)])
        local_rows.append({"site": name, **_with_threshold_metrics(metrics)[0],
                           "pooled": _pooled(alone, tests, schema)})
    return {
        "centralized": centralized,
        **({} if centralized else {"centralized_why_not": NO_CENTRAL_SERIES}),
        "local_only": {**{k: _mean([r["pooled"].get(k) for r in local_rows])
                          for k in ("roc_auc", "pr_auc", "f1")},
                       "per_site": local_rows},
    }


def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values (None if none is)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _site_metrics(result: TrainingResult, test: pd.DataFrame, schema: FederationSchema
                  ) -> dict[str, Any]:
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
    from fed_tasks import dp_sums
    from fed_tasks.dp_step import cumulative_epsilon, noise_multiplier

    spent = max(s.guard.privacy.job_epsilon(spec.job_id) for s in sites)
    if dp_sums.applies(spec):  # row-level noise on the released sums (pca, hbos)
        kind, accountant = "dp_sums", dp_sums.cumulative_epsilon(spec, dp_sums.releases(spec))
        z, clip = dp_sums.noise_multiplier(spec), spec.dp_row_clip
    else:
        kind = "dp_sgd" if spec.dp_sgd else "dp_fedavg"
        accountant = None if spec.dp_sgd else cumulative_epsilon(spec, rounds_run)
        z, clip = noise_multiplier(spec), spec.dp_clip
    return {
        "dp": kind,
        "epsilon_spent": spent,
        "delta": spec.dp_delta,
        "epsilon_target": spec.dp_epsilon,
        "epsilon_accountant": accountant,
        "noise_multiplier": z,
        "clip": clip,
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
    above a fresh dataset's budget), the seeds torch is given (site model and training),
    that each site's statistics fit the fixed-point encoding they are summed in, and every
    later phase's encoding bound that the table alone bounds (see
    :func:`encoding_problems`).
    """
    import torch

    from datasites.governance.policy import DatasetPolicy
    from fed_tasks.encoding import STATS_CODEC
    from fed_tasks.site_step import initial_weights, stats

    if spec.model == "auto":  # every candidate is a job of its own
        for sub in spec.candidate_specs:
            preflight(sub, splits, names)
        return
    policy = DatasetPolicy()
    problems = policy.violations(spec, remaining=policy.epsilon_budget,
                                 rows=min(len(train) for train, _ in splits))
    if problems:
        raise JobRefusedError("the sites' default policy would refuse the job: "
                              + "; ".join(problems))
    try:
        initial_weights(spec)
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
        problems = encoding_problems(spec, len(train))
        if problems:
            raise JobRefusedError(f"{name} has too many rows for the job's secure sums: "
                                  + "; ".join(problems))


def encoding_problems(spec: JobSpec, rows: int) -> list[str]:
    """The phases after the statistics whose sum a site of ``rows`` training rows could
    overflow, judged from the row count alone (the statistics are checked exactly, by
    encoding them). What the table bounds: a histogram or calibration count is at most
    ``rows``; a PCA moment term at most ``Z_CLIP**2``; a training update carries its row
    count ``n`` (plain and secure modes). What it cannot bound, so is left to the site,
    which refuses the call: the rest of a training update (``n·Δ``, ``n·loss`` come out of
    training), a Deep SVDD centre (the network's embeddings of the rows) and a site's
    isolation trees (their values are tree structure, the bound only refuses garbage)."""
    from fed_tasks.detectors.pca import Z_CLIP
    from fed_tasks.schedule import phases

    # DP updates carry no count; a compressed secure update carries the share n/N <= 1
    counted = not spec.dp_enabled and (spec.compress == "none" or spec.aggregation == "plain")
    per_row = {"hist": 1.0, "calibrate": 1.0, "moments2": Z_CLIP ** 2,
               **({"fit": 1.0} if counted else {})}
    specs = spec.candidate_specs if spec.model == "auto" else (spec,)
    problems = []
    for one in specs:
        for phase in phases(one):
            worst = per_row.get(phase.action, 0.0) * rows
            if worst > phase.codec.bound:
                problems.append(f"{one.model} {phase.action}: up to {worst:.3g} per value, "
                                f"above the encoding's bound {phase.codec.bound:g}")
    return problems


def run_demo(cfg: DemoConfig, log: Any = print) -> dict[str, Any]:
    """Run the whole job; returns the report (see the README for its fields)."""
    started = time.perf_counter()
    found, splits = load_tables(cfg)
    schema = found.schema
    if found.warning():
        log(found.warning())
    names = [f"site-{i + 1}" for i in range(len(splits))]
    dp: dict[str, Any] = {}
    row_unit = cfg.dp_unit == "row" and cfg.model not in ROW_DP_MODELS
    if cfg.epsilon is not None:
        dp = {"dp_epsilon": cfg.epsilon, "dp_delta": cfg.delta, "dp_clip": cfg.clip,
              "dp_sgd": row_unit, "dp_adaptive_clip": cfg.adaptive_clip,
              **({"trim": 0.0} if row_unit else {})}
    from datasites.cli.job_options import strategy_options

    spec = JobSpec(model=cfg.model, features=schema.features, label_column=schema.label,
                   rounds=cfg.rounds or DEFAULT_ROUNDS, seed=cfg.seed,
                   aggregation=cfg.aggregation,
                   target_fpr=cfg.target_fpr, patience=cfg.patience, min_delta=cfg.min_delta,
                   min_local_steps=cfg.min_local_steps, time_column=schema.time,
                   personalize_epochs=cfg.personalize_epochs, fraction=cfg.fraction,
                   round_timeout=cfg.round_timeout, async_k=cfg.async_k,
                   compress=cfg.compress,
                   **strategy_options(cfg.strategy, len(splits)), **dp)
    if cfg.epsilon is not None and cfg.dp_unit is None:
        spec, why = dp_usefulness.default_unit(spec)
        if why:
            log(why)
    if spec.dp_sgd and cfg.rounds is None:
        spec = JobSpec.model_validate({**spec.model_dump(), "rounds": DP_SGD_ROUNDS})
    series = schema.time is not None  # a series site's test split is its whole series
    site_sizes = [len(tr) if series else len(tr) + len(te) for tr, te in splits]
    how = {(False, False): "non-IID split", (False, True): "one table per site",
           (True, False): "consecutive segments of one series",
           (True, True): "one series per site"}[(series, len(cfg.data) > 1)]
    log(f"{sum(site_sizes):,} rows, {schema.describe()}; {len(splits)} sites, {how} "
        f"(rows {site_sizes})")
    preflight(spec, splits, names)  # what would fail after provisioning fails here instead
    from datasites.harness.federation import Federation  # imports syft (~10 s): after input checks

    t0 = time.perf_counter()
    with Federation.start(splits, schema, names=names, root=cfg.keep_sites,
                          passwords=cfg.passwords,
                          key_authority=cfg.aggregation == "paillier") as fed:
        provision_s = time.perf_counter() - t0
        log(f"provisioned {len(names)} datasites in {provision_s:.1f} s; "
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
        elif result.converged:
            log(f"early stopping after {result.rounds_completed} of {spec.rounds} rounds: the "
                f"loss improved by less than {spec.min_delta:.0%} for {spec.patience} rounds")
        per_site = _with_threshold_metrics(trainer.evaluate(result))
        privacy = privacy_report(spec, [fed.site(n) for n in names], result.rounds_completed)
    # ROC/PR-AUC of the union (the harness holds it); counts: the sites' own, summed
    federated = {**_pooled(result, [t for _, t in splits], schema), **pooled_counts(per_site)}
    log("training reference models (" + ("each site alone; no centralized model for a "
        "series" if series else "centralized, each site alone") + ") ...")
    refs = reference_models(spec, splits, schema, names)
    return {
        "job_id": spec.job_id,
        "data": [str(p) for p in cfg.data],
        "sites": len(names),
        "rounds": spec.rounds,
        "model": cfg.model,
        "chosen_model": result.spec.model,  # model="auto": the candidate kept
        "selection": result.selection,
        "strategy": spec.strategy,
        "seed": cfg.seed,
        "aggregation": spec.aggregation,
        "features": list(schema.features),
        "time_column": schema.time,
        "evaluation": ("each site's whole series (unsupervised: labels only at evaluation, as "
                       "in NAB)" if series else f"stratified {cfg.test_fraction:.0%} test split "
                       "per site"),
        "dropped_columns": found.report(),
        "target_fpr": spec.target_fpr,
        "threshold": result.threshold,
        "federated": {**federated, "losses": [None if np.isnan(v) else v for v in result.losses]},
        **privacy,
        # a DP job: the expected noise-to-signal ratio judged before training, and the
        # model against its untrained self on the sites' held-out rows after it
        "noise_to_signal": (est.ratio if (est := dp_usefulness.estimate(
            spec, min(len(tr) for tr, _ in splits))) else None),
        "noise_check": noise_check(per_site) if spec.dp_enabled else None,
        "rounds_completed": result.rounds_completed,
        "skipped": result.skipped,  # who missed which call, and why
        "buffered": result.buffered,  # buffered rounds: contributors and their staleness
        # bytes each site's training-round contribution took as it left the site
        "compress": spec.compress,
        "bytes_per_site_round": result.bytes_per_site_round,
        "clipped_values": sum(s.get("clipped", 0) for s in result.sent),
        "sent": result.sent,
        "stopped_early": result.stop_reason or None,
        **refs,
        "per_site": per_site,
        "site_rows": [{"site": n, "train": len(tr), "test": len(te),
                       "test_anomalies": int(te[schema.label].sum()),
                       **({"data": str(cfg.data[i])} if len(cfg.data) > 1 else {})}
                      for i, (n, (tr, te)) in enumerate(zip(names, splits, strict=True))],
        "timing": {"provision_s": provision_s, "train_s": train_s,
                   "round_s": result.round_seconds},
        "seconds": time.perf_counter() - started,
    }
