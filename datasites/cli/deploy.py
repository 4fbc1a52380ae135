"""``fedsyft init | up | down | status | submit | train``: a federation of running servers.

Registered on the ``fedsyft`` app by :mod:`datasites.cli.main`. Every failure is one line and
exit code 2 (the app's rule); ``status`` exits 1 when a server is down.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import click
import typer

from datasites.cli import job_options as opts
from datasites.cli.main import (
    _check_output,
    _column_list,
    _fail,
    _positive,
    _say,
    _say_noise,
    _skipped_lines,
    app,
    console,
)

CONFIG = typer.Option(..., "--config", help="The federation's federation.toml.")
ONE_SITE = typer.Option(None, "--site", help="Only this member (site or key authority).")


def _load(config: Path) -> Any:
    from datasites.deploy.config import ConfigError, load

    try:
        return load(config)
    except ConfigError as exc:
        raise _fail(exc) from None


@app.command()
def init(directory: Path = typer.Argument(..., help="Where to write federation.toml and "
                                                     "the site tables."),
         data: Path = typer.Option(None, help="CSV with numeric features and a 0/1 label "
                                              "[default: the bundled ODDS shuttle table]"),
         label_column: str = typer.Option("anomaly", help="Name of the 0/1 label column."),
         drop_columns: str = typer.Option(None, "--drop-columns", help=(
             "Columns to leave out of the site tables, separated by commas (e.g. categorical "
             "or text columns).")),
         sites: int = typer.Option(3, min=2, max=opts.SITES_MAX, help="Institutions."),
         seed: int = typer.Option(0, min=0, max=opts.SEED_MAX, help="Seed of the split."),
         base_port: int = typer.Option(8100, min=1024, max=65000,
                                       help="Port of the first site; the others follow."),
         time_column: str = typer.Option(None, "--time-column", show_default=False, help=(
             "The table is one series with this date/time column: each site gets a "
             "consecutive segment (for --model lstm-ae jobs)."))
         ) -> None:
    """Write an example federation that `fedsyft up` runs as it is."""
    from datasites.deploy.init import write_example
    from datasites.harness.demo import BUNDLED_TABLE

    if time_column is not None and not time_column.strip():
        raise _fail("--time-column: give the name of the table's time column")
    config = write_example(directory, data or BUNDLED_TABLE, label_column, sites, seed,
                           base_port, _column_list(drop_columns, "--drop-columns"), log=_say,
                           time_column=time_column)
    _say(f"wrote {config} and {sites} site tables in {directory / 'data'}")
    _say("next: set FEDSYFT_OWNER_PASSWORD, FEDSYFT_OFFICER_PASSWORD and "
         f"FEDSYFT_SCIENTIST_PASSWORD, then: fedsyft up --config {config}")


@app.command()
def up(config: Path = CONFIG, site: str = ONE_SITE) -> None:
    """Provision (the first time) and start every site's server; returns once all answer."""
    from datasites.deploy import processes

    cfg = _load(config)
    members = cfg.selected(site)
    for m in members:
        if not processes.port_free(m.host, m.port) and processes.health(m) is None:
            raise _fail(f"site {m.name!r}: port {m.port} on {m.host} is already in use by "
                        "another program (choose another port in the config)")
    from datasites.deploy.provision import provision  # imports syft: after the checks

    started = time.perf_counter()
    made = provision(cfg)
    if made:
        _say(f"provisioned {', '.join(made)} in {time.perf_counter() - started:.1f} s")
    for state in processes.start_all(members):
        _say(f"{state.name:<16} up   {state.url}  pid {state.pid}")


@app.command()
def down(config: Path = CONFIG, site: str = ONE_SITE) -> None:
    """Stop the servers cleanly (each logs server_stopped and closes its store)."""
    from datasites.deploy import processes

    cfg = _load(config)
    for m in cfg.selected(site):
        was = processes.stop(m)
        _say(f"{m.name:<16} {'stopped' if was else 'was not running'}")


@app.command()
def status(config: Path = CONFIG, site: str = ONE_SITE) -> None:
    """Each server: URL, pid, up or down, datasets, pending requests, audit chain."""
    from datasites.deploy import processes

    cfg = _load(config)
    down_count = 0
    _say(f"{'site':<16} {'state':<5} {'url':<24} {'pid':>7}  {'pending':>7}  audit chain")
    for m in cfg.selected(site):
        s = processes.state(m)
        if not s.up:
            down_count += 1
            _say(f"{m.name:<16} {'down':<5} {m.url:<24} {s.pid or '-':>7}  {'-':>7}  - "
                 f"({s.problem})")
            continue
        h = s.health or {}
        audit = h.get("audit") or {}
        chain = (f"intact, {audit.get('entries')} entries" if audit.get("ok")
                 else f"BROKEN: {audit.get('problem')}")
        kind = "key authority" if h.get("kind") == "authority" else f"{h.get('datasets')} dataset"
        _say(f"{m.name:<16} {'up':<5} {m.url:<24} {s.pid:>7}  {h.get('pending_requests'):>7}  "
             f"{chain} ({kind})")
    if down_count:
        raise typer.Exit(1)


def _scientist(cfg: Any, receipts: Path | None = None) -> Any:
    from datasites.deploy.remote import RemoteFederation

    return RemoteFederation.connect(cfg, receipts=receipts)


def _published_policies(fed: Any) -> list[Any]:
    """The policies the sites publish with their dataset (a site without one judges alone)."""
    out = []
    for session in fed.sessions():
        try:
            out.append(session.policy())
        except LookupError:
            continue
    return out


def _useful_dp(spec: Any, dp_unit: str | None, policies: list[Any]) -> Any:
    """The job after the DP unit is chosen (see ``--dp-unit``); refused (exit 2) if the sites'
    published policies would refuse its noise, warned about if they would run it anyway.
    Per-row noise depends on each site's row count, which only the site judges."""
    from fed_tasks import dp_usefulness

    if spec.dp_enabled and dp_unit is None:
        spec, why = dp_usefulness.default_unit(spec)
        if why:
            _say(why)
    for policy in policies:
        problem = dp_usefulness.useless(spec, None, policy.max_noise_ratio)
        if problem and policy.noisy_dp == "refuse":
            raise _fail(f"--epsilon: {problem}")
        if problem:
            console.print(f"warning: {problem} (the sites' policy runs it anyway)",
                          style="yellow", markup=False, highlight=False)
            break
    return spec


@app.command()
def submit(
    config: Path = CONFIG,
    rounds: int = typer.Option(10, min=opts.ROUNDS_MIN, max=opts.ROUNDS_MAX,
                               help="Federated rounds."),
    model: str = typer.Option("ae", click_type=click.Choice(opts.MODELS), help=(
        "Detector: ae, vae, deepsvdd, lstm-ae (a series: needs a time column), pca, hbos, "
        "iforest (plain aggregation only).")),
    time_column: str = typer.Option(None, "--time-column", show_default=False, help=(
        "A series job's time column [default for --model lstm-ae: the config's "
        "time_column].")),
    aggregation: str = typer.Option("plain", click_type=click.Choice(
        ["plain", "paillier", "secagg"]), help="plain | paillier | secagg."),
    seed: int = typer.Option(0, min=0, max=opts.SEED_MAX, help="Seed of the model."),
    label_column: str = typer.Option("anomaly", help="The label column in the mocks."),
    epsilon: float = typer.Option(None, "--epsilon", click_type=_positive(opts.EPSILON_MAX),
                                  help="Differential privacy: the job's epsilon."),
    delta: float = typer.Option(1e-5, "--delta", click_type=_positive(opts.DELTA_MAX),
                                help="DP delta (with --epsilon)."),
    clip: float = typer.Option(1.0, "--clip", click_type=_positive(), help="DP clip."),
    dp_unit: str = typer.Option(None, "--dp-unit", click_type=click.Choice(opts.DP_UNITS),
                                show_default=False, help=opts.DP_UNIT_HELP),
    dp_sgd: bool = typer.Option(False, "--dp-sgd", hidden=True, help="= --dp-unit row."),
    adaptive_clip: bool = typer.Option(False, "--adaptive-clip", help=opts.ADAPTIVE_CLIP_HELP),
    target_fpr: float = typer.Option(None, "--target-fpr", click_type=_positive(
        below=opts.TARGET_FPR_MAX), help="Alarm threshold: the score this fraction of the "
        "training rows exceed [default: no threshold, ranking only]."),
    patience: int = typer.Option(0, min=0, max=opts.PATIENCE_MAX, help=(
        "Early stopping (neural models): rounds without a 1% loss improvement; 0: off.")),
    compress: str = typer.Option("none", "--compress", help=opts.COMPRESS_HELP),
    strategy: str = typer.Option("fedavg", click_type=click.Choice(opts.STRATEGIES), help=(
        "How each round's updates are combined: fedavg, fedprox, scaffold, fedadam, fedyogi "
        "(every mode); median, trimmed-mean, krum (--aggregation plain only).")),
    personalize: int = typer.Option(0, "--personalize", min=0, max=opts.PERSONALIZE_MAX,
                                    help="Epochs each site fine-tunes its own copy after the "
                                         "rounds (the copy never leaves the site)."),
    fraction: float = typer.Option(1.0, "--fraction", click_type=_positive(1.0), help=(
        "Each training round calls this fraction of the sites (--aggregation plain only).")),
    round_timeout: float = typer.Option(None, "--round-timeout", click_type=_positive(
        86_400.0), show_default=False, help=(
        "Seconds a round waits for a site before skipping it [default: wait for every "
        "site].")),
    async_k: int = typer.Option(None, "--async", min=1, max=opts.SITES_MAX,
                                show_default=False, help=(
        "Buffered rounds (FedBuff): a round's aggregate is formed once K sites answered "
        "[default: every round waits for every site].")),
) -> None:
    """The data scientist submits a job to every site: prints the job id and request ids."""
    try:
        dp_unit = opts.dp_unit_of(epsilon, dp_unit, dp_sgd=dp_sgd, adaptive_clip=adaptive_clip,
                                  clip=clip, delta=delta)
    except opts.JobOptionError as exc:
        raise _fail(exc) from None
    cfg = _load(config)
    sites_time = cfg.site[0].time_column  # the sites' time column: never a feature
    if time_column is None and model in opts.SERIES_MODELS:
        time_column = sites_time
    try:
        opts.check_job_options(sites=len(cfg.site), rounds=rounds, model=model,
                               aggregation=aggregation, seed=seed, epsilon=epsilon,
                               delta=delta, clip=clip, dp_unit=dp_unit,
                               adaptive_clip=adaptive_clip,
                               target_fpr=target_fpr, patience=patience,
                               time_column=time_column, compress=compress,
                               strategy=strategy, personalize=personalize,
                               fraction=fraction, round_timeout=round_timeout,
                               async_k=async_k)
    except opts.JobOptionError as exc:
        raise _fail(exc) from None
    if sites_time is not None and time_column not in (None, sites_time):
        raise _fail(f"--time-column {time_column}: the sites' time column is {sites_time} "
                    f"(time_column in {cfg.path})")
    if aggregation == "paillier" and cfg.key_authority is None:
        raise _fail(f"--aggregation paillier needs a [key_authority] in {cfg.path}")
    from pydantic import ValidationError

    from datasites.deploy.jobs import save_job
    from fed_tasks.spec import JobSpec

    fed = _scientist(cfg)
    columns = [str(c) for c in fed.sessions()[0].mock("train").columns]
    if label_column not in columns:
        raise _fail(f"--label-column {label_column}: not a column of the sites' tables "
                    f"({', '.join(columns)})")
    if time_column is not None and time_column not in columns:
        raise _fail(f"--time-column {time_column}: not a column of the sites' tables "
                    f"({', '.join(columns)})")
    dp: dict[str, Any] = {}
    row = dp_unit == "row" and model not in opts.ROW_DP_MODELS
    if epsilon is not None:
        dp = {"dp_epsilon": epsilon, "dp_delta": delta, "dp_clip": clip, "dp_sgd": row,
              "dp_adaptive_clip": adaptive_clip, **({"trim": 0.0} if row else {})}
    not_features = (label_column, time_column, sites_time)
    rounds_how = {**opts.strategy_options(strategy, len(cfg.site)),
                  "personalize_epochs": personalize, "fraction": fraction,
                  "round_timeout": round_timeout, "async_k": async_k}
    # the federation's floor; Krum needs every site in each round (strategy_options)
    if strategy != "krum":
        rounds_how["min_sites"] = cfg.federation.min_sites
    try:
        spec = JobSpec(model=model, features=tuple(c for c in columns if c not in not_features),
                       label_column=label_column, time_column=time_column, rounds=rounds,
                       seed=seed, aggregation=aggregation, target_fpr=target_fpr,
                       patience=patience, compress=compress, **rounds_how, **dp)
    except ValidationError as exc:
        raise _fail(opts.spec_error_line(exc)) from None
    spec = _useful_dp(spec, dp_unit, _published_policies(fed))
    ids = fed.submit(spec)
    save_job(spec, cfg.path, ids)
    _say(f"job {spec.job_id}")
    for name, rid in ids.items():
        _say(f"  {name:<16} request {rid}")
    _say(f"each data owner reviews it: fedsyft requests show REQUEST --config {cfg.path} "
         "--site NAME; then: fedsyft train --config ... --job " + spec.job_id)


@app.command()
def train(config: Path = CONFIG,
          job: str = typer.Option(..., "--job", help="The job id printed by submit."),
          report: Path = typer.Option(None, "--report", help="Write the JSON report here."),
          resume: bool = typer.Option(False, "--resume", help=(
              "Continue after the last checkpointed round (after a crash or a site "
              "restart) instead of starting over.")),
          wait: float = typer.Option(0.0, "--wait", min=0.0, max=86400.0, help=(
              "Seconds to wait for the approvals [default: look once]."))) -> None:
    """Run an approved job's rounds at every site, then each site's evaluation."""
    from datasites.deploy.jobs import load_job
    from datasites.deploy.remote import NotApprovedError

    cfg = _load(config)
    record = load_job(job)
    if report is not None:
        _check_output(report, "--report", create_parents=True)
    if record.checkpoint.exists() and not resume:
        raise _fail(f"job {job} already ran (checkpoint {record.checkpoint}); continue it "
                    "with --resume")
    fed = _scientist(cfg, receipts=record.receipts)
    spec = record.spec
    try:
        fed.wait_for_approval(spec, timeout=wait)
    except NotApprovedError as exc:
        raise _fail(exc) from None
    trainer = fed.trainer(spec)
    started = time.perf_counter()
    result = trainer.fit(checkpoint=record.checkpoint, resume=resume and
                         record.checkpoint.exists())
    from datasites.harness.demo import _with_threshold_metrics

    per_site = _with_threshold_metrics(trainer.evaluate(result))
    out = _train_report(spec, cfg, result, per_site, time.perf_counter() - started)
    for row in per_site:
        _say(site_line(row))
    if result.stopped_early:
        _say(f"stopped after {result.rounds_completed} rounds: {result.stop_reason}")
    for line in _skipped_lines(out):
        _say(line)
    _say_noise(out)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(out, indent=2))
        _say(f"report written to {report}")


def site_line(row: dict[str, Any]) -> str:
    """One site's evaluation: "-" for a metric it cannot have (ROC-AUC of a one-class test
    split, F1 where nothing counts); F1 at the alarm threshold when the job has one."""
    from datasites.cli.main import _num

    f1 = f"  F1 {_num(row.get('f1'), 2)} at the threshold" if "tp" in row else ""
    return (f"{row['site']:<16} ROC-AUC {_num(row.get('roc_auc'))}  PR-AUC "
            f"{_num(row.get('pr_auc'))}{f1}  ({row['n_test']} test rows)")


def _weighted_mean(per_site: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the sites that have it, weighted by test rows (None if none)."""
    known = [(r[key], r["n_test"]) for r in per_site if r.get(key) is not None]
    total = sum(n for _, n in known)
    return sum(v * n for v, n in known) / total if total else None


def _train_report(spec: Any, cfg: Any, result: Any, per_site: list[dict[str, Any]],
                  seconds: float) -> dict[str, Any]:
    import math

    from datasites.harness.demo import pooled_counts
    from fed_tasks import dp_sums, dp_usefulness
    from fed_tasks.dp_step import cumulative_epsilon, noise_multiplier
    from fed_tasks.evaluation import noise_check

    dp = None if not spec.dp_enabled else ("dp_sums" if dp_sums.applies(spec) else
                                           "dp_sgd" if spec.dp_sgd else "dp_fedavg")
    return {
        "job_id": spec.job_id, "config": str(cfg.path), "sites": len(cfg.site),
        "rounds": spec.rounds, "model": spec.model, "seed": spec.seed,
        "aggregation": spec.aggregation,
        "federated": {
            # over the sites with both classes in their test split, weighted by test rows
            "roc_auc_mean": _weighted_mean(per_site, "roc_auc"),
            "pr_auc_mean": _weighted_mean(per_site, "pr_auc"),
            **pooled_counts(per_site),  # summed counts and P/R/F1 at the threshold, if any
            "losses": [None if math.isnan(v) else v for v in result.losses]},
        "dp": dp, "delta": spec.dp_delta if dp else None,
        "epsilon_accountant": (cumulative_epsilon(spec, result.rounds_completed)
                               if dp == "dp_fedavg" else
                               dp_sums.cumulative_epsilon(spec, dp_sums.releases(spec))
                               if dp == "dp_sums" else None),
        "noise_multiplier": (noise_multiplier(spec) if dp == "dp_fedavg" else
                             dp_sums.noise_multiplier(spec) if dp == "dp_sums" else None),
        "skipped": result.skipped,  # who missed which call, and why
        "noise_to_signal": (est.ratio if (est := dp_usefulness.estimate(spec)) else None),
        "noise_check": noise_check(per_site) if dp else None,
        "rounds_completed": result.rounds_completed,
        "stopped_early": result.stop_reason or None,
        "per_site": per_site,
        "timing": {"train_s": seconds, "round_s": result.round_seconds},
        "weights_sha256": hashlib.sha256(result.weights.tobytes()).hexdigest(),
    }


def owner_client(config: Path, site: str, owner: str | None) -> Any:
    """The data owner's session with her site's running server (``requests --config``)."""
    from datasites.deploy.remote import OwnerClient

    return OwnerClient(*member_login(config, site, "owner", owner))


def member_login(config: Path, site: str, role: str, email: str | None
                 ) -> tuple[Any, str, str]:
    """(member, e-mail, password) of the site's ``role`` ("owner" | "officer") for a CLI
    command: the e-mail from the config unless given, the password from
    ``FEDSYFT_{ROLE}_PASSWORD[_SITE]`` or a prompt; an unknown site is one line."""
    from datasites.cli.main import _password
    from datasites.deploy.config import password_env

    try:
        member = _load(config).member(site)
    except (KeyError, LookupError, ValueError) as exc:
        raise _fail(exc) from None
    email = email or getattr(member, role)
    names = password_env(role, member.name)
    env = next((v for v in names if os.environ.get(v)), names[-1])
    who = {"owner": "data owner", "officer": "compliance officer"}[role]
    return member, email, _password(env, f"{who} {email} of {member.name}")
