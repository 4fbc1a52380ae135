"""``fedsyft``: the demo federation, the data owner's ``requests`` and the officer's ``audit``.

Passwords never come from files or the command line: environment variables or a hidden
prompt. Bad input (unknown site directory or request id, wrong credentials, a broken audit
log) is one line on stderr and exit code 2; ``audit verify`` exits 1 when the chain breaks.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from datasites.cli import job_options as opts

console = Console()
err = Console(stderr=True)
DEMO_ROUNDS = None  # the demo's rounds: harness.demo.DEFAULT_ROUNDS, or fewer under DP-SGD
DEMO_PATIENCE = 0  # early stopping of the demo's neural models (0: every round)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (a multi-line message is joined, never dumped)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _known_failures() -> tuple[type[BaseException], ...]:
    """What bad input or a damaged site directory raises: each is one line and exit 2.

    OSError (a path that cannot be read or written), EOFError and zlib.error (a truncated
    or corrupt compressed table), ValueError (tables, policies, audit logs, site files),
    LookupError (an unknown id) and RuntimeError (a corrupt ledger, a ledger or policy that
    disagrees with the audit log, a site that could not be provisioned or is busy).
    """
    import zlib

    return (OSError, EOFError, zlib.error, ValueError, LookupError, RuntimeError)


def _allowed(kind: click.ParamType) -> str:
    """What an option accepts, in words ("2 to 20", "plain, paillier, secagg")."""
    if isinstance(kind, click.Choice):
        return ", ".join(map(str, kind.choices))
    if not isinstance(kind, (click.IntRange, click.FloatRange)):
        return ""
    if isinstance(kind, click.IntRange) and None not in (kind.min, kind.max) and not (
            kind.min_open or kind.max_open):
        return f"{kind.min} to {kind.max}"
    low = None if kind.min is None else (f"{'above' if kind.min_open else 'at least'} "
                                         f"{kind.min:g}")
    high = None if kind.max is None else (f"{'below' if kind.max_open else 'at most'} "
                                          f"{kind.max:g}")
    return ", ".join(part for part in (low, high) if part)


def _usage_line(exc: click.UsageError) -> str:
    """A click usage error as ``--flag: problem (allowed: ...)`` on one line, instead of
    typer's multi-line usage box."""
    param = getattr(exc, "param", None)
    command = exc.ctx.command_path if exc.ctx is not None else "fedsyft"
    if isinstance(exc, click.NoSuchOption):
        maybe = f" (did you mean {' or '.join(exc.possibilities)}?)" if exc.possibilities else ""
        return f"no such option {exc.option_name}{maybe}; see '{command} --help'"
    if param is None:
        message = _one_line(click.ClickException(exc.format_message())).rstrip(".")
        return f"{message}; see '{command} --help'"
    flag = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
    if isinstance(exc, click.MissingParameter):
        return f"missing {exc.param_type or 'option'} {flag}; see '{command} --help'"
    message = re.sub(r" is not in the range .*", " is out of range", exc.message)
    message = re.sub(r" is not (one of )?'.*", " is not a choice", message).rstrip(".")
    message = message.replace("valid integer range", "valid integer").replace(
        "valid float range", "valid number")
    allowed = _allowed(param.type)
    return f"{flag}: {message}" + (f" (allowed: {allowed})" if allowed else "")


class _OneLineErrors(TyperGroup):
    """The root command group: a known failure anywhere below is one line on stderr and
    exit code 2, never a traceback (and so never a dump of local variables that could hold
    a password); so is a bad option, never typer's usage box. Anything else is a bug and
    keeps its plain traceback (no locals)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:  # the root's own options are parsed here, outside invoke
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _fail(_usage_line(exc)) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _fail(_usage_line(exc)) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except _known_failures() as exc:
            err.print(f"error: {_one_line(exc)}", markup=False, highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2) from None


# No pretty tracebacks: rich's show_locals printed the passwords held in local variables.
_TYPER_SAFE = {"pretty_exceptions_enable": False, "pretty_exceptions_show_locals": False}
app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_OneLineErrors,
                  help="Federated anomaly detection across PySyft datasites.", **_TYPER_SAFE)


@app.callback()
def _root() -> None:
    """Federated anomaly detection across PySyft datasites."""


def _num(value: float | None, digits: int = 3) -> str:
    """A metric for the table; "-" where it is undefined (e.g. ROC-AUC of a one-class test
    split, precision when nothing raised an alarm)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _rounds(report: dict[str, Any]) -> str:
    """'N rounds, ' for a model trained in rounds ('N of M' if it stopped early)."""
    done = report.get("rounds_completed", report["rounds"])
    if not done:
        return ""  # built from summed statistics, not trained in rounds
    of = "" if done == report["rounds"] else f" of {report['rounds']}"
    return f"{done}{of} rounds, "


def results_table(report: dict[str, Any]) -> Table:
    """Federated vs centralized vs local-only, per site and pooled: ROC-AUC / PR-AUC, and F1
    at the calibrated alarm threshold when the job has one."""
    with_f1 = report.get("threshold") is not None
    metrics = "ROC-AUC / PR-AUC" + (" / F1 at the threshold" if with_f1 else "")
    series = report.get("time_column") is not None
    where = "each site's whole private series" if series else "the sites' private test splits"
    table = Table(title=f"{metrics} on {where}\n"
                        f"{_model_words(report)}, {report['sites']} sites, "
                        f"{_rounds(report)}{report['aggregation']} aggregation"
                        + (f", {report['dp']} epsilon {report['epsilon_spent']:.3g}"
                           if report.get("dp") else ""))
    sites = [row["site"] for row in report["per_site"]]
    table.add_column("model")
    for name in sites:
        table.add_column(name, justify="right")
    table.add_column("pooled", justify="right", style="bold")
    central = report.get("centralized")
    rows = (("federated", report["per_site"], report["federated"]),
            *((("centralized", central["per_site"], central),) if central else ()),
            ("local-only", report["local_only"]["per_site"], report["local_only"]))

    def cell(r: dict[str, Any]) -> str:
        text = f"{_num(r.get('roc_auc'))} / {_num(r.get('pr_auc'))}"
        return text + (f" / {_num(r.get('f1'), 2)}" if with_f1 else "")

    for label, per_site, pooled in rows:
        table.add_row(label, *(cell(r) for r in per_site), cell(pooled))
    table.caption = ("pooled = union of all test splits; local-only = mean over sites of a "
                     "model trained on one site alone")
    if series:
        table.caption = ("pooled = each site's series scored by itself, concatenated; "
                         "local-only = mean over sites of a model trained on one site alone; "
                         f"centralized: {report.get('centralized_why_not', 'not applicable')}")
    return table


def _threshold_line(report: dict[str, Any]) -> str:
    """The alarm threshold and the pooled precision / recall / F1 at it, in one line."""
    if report.get("threshold") is None:
        why = ("no threshold under differential privacy (the score counts are not noised "
               "yet)" if report.get("dp") else "no alarm threshold (ranking only)")
        return why if report.get("target_fpr") is not None else "no alarm threshold"
    fed = report["federated"]
    return (f"alarm threshold {report['threshold']:.4g} (exceeded by {report['target_fpr']:.1%} "
            f"of the training rows): pooled precision {_num(fed.get('precision'))}, recall "
            f"{_num(fed.get('recall'))}, F1 {_num(fed.get('f1'))} "
            f"(tp {fed.get('tp')}, fp {fed.get('fp')}, fn {fed.get('fn')}, tn {fed.get('tn')})")


def _kept_site_passwords(keep_sites: Path | None, sites: int, authority: bool = False
                         ) -> dict[str, dict[str, str]]:
    """Owner/officer passwords of kept sites (and of the key authority, whose directory is
    kept too): from the environment, else random (and printed once)."""
    if keep_sites is None:
        return {}
    from datasites.runtime.site_files import leftover_message, leftovers

    found = leftovers(keep_sites)
    if found:
        raise _fail(leftover_message(found))
    if keep_sites.exists() and (not keep_sites.is_dir() or any(keep_sites.iterdir())):
        raise _fail(f"--keep-sites {keep_sites} must be an empty or new directory")
    from datasites.governance.accounts import (
        WeakPasswordError,
        check_password,
        new_password,
        password_from_env,
    )

    chosen = {}
    for var in ("FEDSYFT_OWNER_PASSWORD", "FEDSYFT_OFFICER_PASSWORD"):  # the same rule
        value = password_from_env(var)
        try:
            chosen[var] = check_password(value, var) if value is not None else None
        except WeakPasswordError as exc:
            raise _fail(exc) from None
    owner, officer = chosen["FEDSYFT_OWNER_PASSWORD"], chosen["FEDSYFT_OFFICER_PASSWORD"]
    names = [f"site-{i + 1}" for i in range(sites)] + (["key-authority"] if authority else [])
    return {name: {"owner": owner or new_password(), "officer": officer or new_password()}
            for name in names}


def _print_kept_sites(cfg: Any) -> None:
    """Where the kept sites are and how to log in; random passwords appear here only."""
    if cfg.keep_sites is None or not cfg.passwords:
        return
    from datasites.runtime.site_files import SiteDirectoryError, officer_email, read_site_info

    owner_env = bool(os.environ.get("FEDSYFT_OWNER_PASSWORD"))
    officer_env = bool(os.environ.get("FEDSYFT_OFFICER_PASSWORD"))
    lines = []
    for name, pw in cfg.passwords.items():
        try:
            info = read_site_info(cfg.keep_sites / name)
            officer = officer_email(info.directory)
        except SiteDirectoryError:
            continue
        owner_pw = "$FEDSYFT_OWNER_PASSWORD" if owner_env else pw["owner"]
        officer_pw = "$FEDSYFT_OFFICER_PASSWORD" if officer_env else pw["officer"]
        lines.append(f"  {name}: data owner {info.email('data_owner')} password {owner_pw} ; "
                     f"compliance officer {officer} password {officer_pw}")
    if lines:
        _say(f"kept sites in {cfg.keep_sites} (random passwords are shown only now, and are "
             "stored nowhere):")
        for line in lines:
            _say(line)
        _say(f"try: fedsyft requests list --site {cfg.keep_sites / next(iter(cfg.passwords))}")


class _PositiveFinite(click.FloatRange):
    """A finite float above 0: typer's own min/max can neither exclude the bound itself nor
    refuse NaN (which passes every comparison and reached the job as a vaguer error)."""

    def __init__(self, at_most: float | None = None, max_open: bool = False) -> None:
        super().__init__(min=0.0, min_open=True, max=at_most, max_open=max_open)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        return number


def _positive(at_most: float | None = None, below: float | None = None) -> click.FloatRange:
    """A finite float above 0, and at most ``at_most`` or below ``below``."""
    if below is not None:
        return _PositiveFinite(below, max_open=True)
    return _PositiveFinite(at_most)


def _column_list(value: str | None, flag: str) -> tuple[str, ...]:
    """``a,b`` as ("a", "b"); an empty name is refused."""
    if value is None:
        return ()
    names = tuple(part.strip() for part in value.split(","))
    if not all(names):
        raise _fail(f"{flag}: {value!r} has an empty column name (give names separated by "
                    "commas, e.g. ward,note)")
    return names


def _demo_tables(data: list[Path] | None, sites: int | None) -> tuple[tuple[Path, ...], int]:
    """The input tables and the number of sites: one table is split into ``--sites`` (default
    3); k >= 2 tables are k sites, one each (``--sites``, if given, must be k)."""
    from datasites.harness.demo import BUNDLED_TABLE

    files = tuple(data or ())
    if len(files) < 2:
        return files or (BUNDLED_TABLE,), 3 if sites is None else sites
    seen: dict[Path, Path] = {}
    for path in files:
        key = path.expanduser().resolve()
        if key in seen:
            raise _fail(f"--data {path} is given twice (one table per site)")
        seen[key] = path
    if len(files) > opts.SITES_MAX:
        raise _fail(f"--data: {len(files)} tables, one site each, is more than "
                    f"{opts.SITES_MAX} sites")
    if sites is not None and sites != len(files):
        raise _fail(f"--sites {sites} does not match the {len(files)} --data tables (one site "
                    "per table); leave --sites out")
    return files, len(files)


@app.command()
def demo(
    data: list[Path] = typer.Option(None, show_default=False, help=(
        "CSV with numeric features and a 0/1 label column [default: bundled ODDS shuttle "
        "table]. One table is split across --sites non-IID sites; give --data once per "
        "institution (k >= 2 times) for k sites holding one table each.")),
    label_column: str = typer.Option("anomaly", help="Name of the 0/1 label column."),
    drop_columns: str = typer.Option(None, "--drop-columns", show_default=False, help=(
        "Columns to leave out, separated by commas (e.g. categorical or text columns).")),
    sites: int = typer.Option(None, min=opts.SITES_MIN, max=opts.SITES_MAX, show_default=False,
                              help=(
        "Number of institutions one table is split into [default: 3; with several --data: "
        "one per table].")),
    rounds: int = typer.Option(DEMO_ROUNDS, min=opts.ROUNDS_MIN, max=opts.ROUNDS_MAX,
                               show_default=False, help=(
        "Federated rounds, at most (see --patience) [default: 10; 3 when --epsilon trains "
        "per row (DP-SGD), whose every epoch costs noise].")),
    model: str = typer.Option("ae", click_type=click.Choice(opts.MODELS), help=(
        "Detector: ae (autoencoder), vae (variational autoencoder), deepsvdd, lstm-ae (LSTM "
        "autoencoder of a series; needs --time-column), pca, hbos, iforest (isolation "
        f"forest). --aggregation plain only: {', '.join(opts.PLAIN_ONLY)}; "
        f"--epsilon: {', '.join(opts.DP_MODELS)} only.")),
    time_column: str = typer.Option(None, "--time-column", show_default=False, help=(
        "A series job (--model lstm-ae): the column holding each row's date/time (numbers: "
        "seconds since 1970). Rows are sorted by it, never trained on; one --data series is "
        "cut into --sites consecutive segments (no shuffle), several --data are one device "
        "each; every site is evaluated on its whole series.")),
    aggregation: str = typer.Option("plain", click_type=click.Choice(
        ["plain", "paillier", "secagg"]), help="How updates are combined: plain | paillier "
        "(key authority decrypts sums only) | secagg."),
    target_fpr: float = typer.Option(0.05, "--target-fpr", click_type=_positive(
        below=opts.TARGET_FPR_MAX), help=(
        "Alarm threshold: the score this fraction of the training rows exceed (calibrated "
        "from summed score histograms; no score leaves a site).")),
    patience: int = typer.Option(DEMO_PATIENCE, min=0, max=opts.PATIENCE_MAX, help=(
        "Early stopping of the neural models: stop once the federated loss improved by less "
        "than 1% for this many rounds in a row; 0 runs every round.")),
    strategy: str = typer.Option("fedavg", click_type=click.Choice(opts.STRATEGIES), help=(
        "How each round's updates are combined: fedavg, fedprox, scaffold, fedadam, fedyogi "
        "(every mode); median, trimmed-mean, krum (robust to a poisoning site; --aggregation "
        "plain only).")),
    personalize: int = typer.Option(0, "--personalize", min=0, max=opts.PERSONALIZE_MAX,
                                    help=(
        "After the rounds each site fine-tunes its own copy for this many epochs and reports "
        "global and personalized metrics (the copy never leaves the site).")),
    fraction: float = typer.Option(1.0, "--fraction", click_type=_positive(1.0), help=(
        "Each training round calls this fraction of the sites (a public draw from --seed, "
        "at least 2); the others catch up on the aggregates they missed at their next "
        "call. --aggregation plain only.")),
    round_timeout: float = typer.Option(None, "--round-timeout", click_type=_positive(
        86_400.0), show_default=False, help=(
        "Seconds a round waits for a site; a site still silent is skipped for that round "
        "and named in the report (paillier: it stays out; secagg: a dropout the secure sum "
        "recovers from) "
        "[default: wait for every site].")),
    async_k: int = typer.Option(None, "--async", min=1, max=opts.SITES_MAX,
                                show_default=False, help=(
        "Buffered asynchronous rounds (FedBuff): a round's aggregate is formed once K sites "
        "have answered; a slower site's update joins a later round, down-weighted by its "
        "staleness (paillier: the key authority weighs the late ciphertexts; secagg: the "
        "late site masks its update again into a later round) [default: every round waits "
        "for every site].")),
    compress: str = typer.Option("none", "--compress", help=opts.COMPRESS_HELP),
    seed: int = typer.Option(0, min=0, max=opts.SEED_MAX,
                             help="Seed for the split and the model."),
    report: Path = typer.Option(None, help="Write the JSON report here."),
    keep_sites: Path = typer.Option(None, "--keep-sites", help=(
        "Keep the site directories here (for `fedsyft requests` / `fedsyft audit`). Owner and "
        "officer passwords: FEDSYFT_OWNER_PASSWORD / FEDSYFT_OFFICER_PASSWORD, else random "
        "and printed once.")),
    epsilon: float = typer.Option(None, "--epsilon", click_type=_positive(opts.EPSILON_MAX),
                                  help=(
        "Differential privacy: the job's epsilon, charged to each site's privacy ledger "
        "round by round [default: no DP]. Sites refuse a job above their remaining budget.")),
    delta: float = typer.Option(1e-5, "--delta", click_type=_positive(opts.DELTA_MAX),
                                help="DP delta (with --epsilon)."),
    clip: float = typer.Option(1.0, "--clip", click_type=_positive(), help=(
        "DP clipping bound: L2 norm of a site's update (--dp-unit site), or of a row's "
        "gradient (--dp-unit row).")),
    dp_unit: str = typer.Option(None, "--dp-unit", click_type=click.Choice(opts.DP_UNITS),
                                show_default=False, help=opts.DP_UNIT_HELP),
    dp_sgd: bool = typer.Option(False, "--dp-sgd", hidden=True, help="= --dp-unit row."),
    adaptive_clip: bool = typer.Option(False, "--adaptive-clip", help=opts.ADAPTIVE_CLIP_HELP),
) -> None:
    """Split a table across non-IID sites (or take one table per site), provision datasites,
    train, calibrate the alarm threshold, evaluate, report."""
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    try:
        dp_unit = opts.dp_unit_of(epsilon, dp_unit, dp_sgd=dp_sgd, adaptive_clip=adaptive_clip,
                                  clip=clip, delta=delta)
    except opts.JobOptionError as exc:
        raise _fail(exc) from None
    tables, n_sites = _demo_tables(data, sites)
    dropped = _column_list(drop_columns, "--drop-columns")
    try:  # every option against the job it becomes, before any file is read or written
        opts.check_job_options(sites=n_sites, rounds=rounds or opts.DEFAULT_ROUNDS,
                               model=model,
                               aggregation=aggregation, seed=seed, epsilon=epsilon,
                               delta=delta, clip=clip, dp_unit=dp_unit,
                               adaptive_clip=adaptive_clip,
                               target_fpr=target_fpr, patience=patience,
                               time_column=time_column, strategy=strategy,
                               personalize=personalize, fraction=fraction,
                               round_timeout=round_timeout, async_k=async_k,
                               compress=compress)
    except opts.JobOptionError as exc:
        raise _fail(exc) from None
    if report is not None:
        _check_output(report, "--report", create_parents=True)
    if keep_sites is not None:  # syft's store URL needs an absolute path
        keep_sites = keep_sites.expanduser().resolve()
    passwords = _kept_site_passwords(keep_sites, n_sites,  # checks --keep-sites first
                                     authority=aggregation == "paillier")
    from datasites.errors import AuthenticationError, ProvisioningError
    from datasites.harness.demo import DemoConfig, run_demo
    from datasites.runtime.tables import TableError
    from fed_tasks.interface import SiteRefusedError

    cfg = DemoConfig(data=tables, label_column=label_column, sites=n_sites, rounds=rounds,
                     model=model, drop_columns=dropped, target_fpr=target_fpr,
                     time_column=time_column,
                     patience=patience, seed=seed, aggregation=aggregation,
                     strategy=strategy, personalize_epochs=personalize,
                     fraction=fraction, round_timeout=round_timeout, async_k=async_k,
                     compress=compress,
                     keep_sites=keep_sites, passwords=passwords,
                     epsilon=epsilon, delta=delta, clip=clip, dp_unit=dp_unit,
                     adaptive_clip=adaptive_clip)

    def log(msg: str) -> None:
        style = "yellow" if msg.startswith("warning:") else "dim"
        console.print(msg, style=style, markup=False, highlight=False)

    try:
        result = run_demo(cfg, log=log)
    except (TableError, ProvisioningError, AuthenticationError, SiteRefusedError,
            ValueError, PermissionError) as exc:
        from pydantic import ValidationError

        why = opts.spec_error_line(exc) if isinstance(exc, ValidationError) else _one_line(exc)
        raise _fail(why) from None
    finally:
        _print_kept_sites(cfg)
    console.print(results_table(result))
    _say(_threshold_line(result))
    for line in (_selection_lines(result) + _personalized_lines(result)
                 + _skipped_lines(result) + _stale_lines(result) + _sent_lines(result)):
        _say(line)
    if result["dropped_columns"]["constant"] or result["dropped_columns"]["user"]:
        _say(f"columns left out: constant {result['dropped_columns']['constant']}, "
             f"--drop-columns {result['dropped_columns']['user']}")
    if result.get("dp"):
        console.print(f"differential privacy ({result['dp']}): epsilon spent "
                      f"{result['epsilon_spent']:.3g} (max over sites' ledgers) at delta "
                      f"{result['delta']:g}, noise multiplier "
                      + (f"{result['noise_multiplier']:.3g}" if result["noise_multiplier"]
                         else "per site (DP-SGD)"))
        _say_noise(result)
    console.print(f"finished in {result['seconds']:.1f} s "
                  f"(provisioning {result['timing']['provision_s']:.1f} s, federated training "
                  f"{result['timing']['train_s']:.1f} s)")
    if report:
        try:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2))
        except OSError as exc:
            raise _fail(f"cannot write the report to --report {report}: "
                        f"{exc.strerror or exc}") from None
        console.print(f"report written to {report}")


def _sent_lines(report: dict[str, Any]) -> list[str]:
    """What one site sent per training round (and what the compression clipped)."""
    size = report.get("bytes_per_site_round")
    if size is None:
        return []
    clipped = report.get("clipped_values") or 0
    return [f"training updates (--compress {report.get('compress', 'none')}): {size:,.0f} "
            f"bytes per site per round" + (f"; {clipped:,} values clipped to the encoding's "
                                           "bound at the sites" if clipped else "")]


def _skipped_lines(report: dict[str, Any]) -> list[str]:
    """Which site missed which round, and why (not selected, too slow, dropped out)."""
    grouped: dict[tuple[str, int, str], list[str]] = {}
    for s in report.get("skipped") or []:
        grouped.setdefault((s["action"], s["round"], s["why"]), []).append(s["site"])
    return [f"{action} {rnd}: skipped {', '.join(sites)} ({why})"
            for (action, rnd, why), sites in grouped.items()]


def _stale_lines(report: dict[str, Any]) -> list[str]:
    """Buffered rounds: which stale updates joined which round, at what weight."""
    return [f"fit {b['round']}: {b['site']}'s update was {b['staleness']} round"
            f"{'s' if b['staleness'] > 1 else ''} stale (weight {b['weight']:.2f})"
            for b in report.get("buffered") or [] if b["staleness"] > 0]


def _say_noise(report: dict[str, Any]) -> None:
    """A DP job's noise before training, and whether its model beat the untrained one."""
    from fed_tasks.evaluation import noise_warning

    check = report.get("noise_check")
    if report.get("noise_to_signal") is not None:
        _say(f"expected noise-to-signal ratio of a release: {report['noise_to_signal']:.3g} "
             "(above 1 the noise swamps the signal)")
    if check:
        _say(f"DP model vs untrained, sites' held-out rows: ROC-AUC {check['roc_auc']:.3f} "
             f"vs {check['untrained_roc_auc']:.3f}")
    warning = noise_warning(check)
    if warning:
        console.print(warning, style="bold red", markup=False, highlight=False)


def _model_words(report: dict[str, Any]) -> str:
    """The job's model; for --model auto, the candidate it kept."""
    model = report.get("model", "ae")
    return f"auto -> {report['chosen_model']}" if model == "auto" else model


def _selection_lines(result: dict[str, Any]) -> list[str]:
    """--model auto: each candidate's pooled validation ROC-AUC, and the one kept."""
    out = []
    for c in result.get("selection") or []:
        auc = c["validation_roc_auc"]
        out.append(f"candidate {c['model']}: validation ROC-AUC "
                   + (f"{auc:.3f}" if auc is not None else "-")
                   + (" <- chosen" if c["chosen"] else ""))
    return out


def _personalized_lines(result: dict[str, Any]) -> list[str]:
    """--personalize: each site's global vs personalized ROC-AUC (its own copy)."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, int | float) else "-"

    return [f"{s['site']}: ROC-AUC global {fmt(s.get('roc_auc'))}, personalized "
            f"{fmt(s['personalized'].get('roc_auc'))}"
            for s in result.get("per_site") or [] if s.get("personalized")]


def _check_output(path: Path, flag: str, *, create_parents: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, or one
    whose directory does not exist (``create_parents``: whose nearest existing ancestor is
    not a directory) or is not writable."""
    if path.is_dir():
        raise _fail(f"{flag} {path} is a directory; give a file name")
    parent = path.parent
    while create_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise _fail(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise _fail(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(f"{flag} {path}: directory {parent} is not writable")


# ---- data owners: requests at one site ---------------------------------------------------
requests_app = typer.Typer(no_args_is_help=True, **_TYPER_SAFE, help=(
    "Data owner: list, read, approve or deny the requests at your site. The site is reopened "
    "from its directory, acts, and is closed again. Password: FEDSYFT_OWNER_PASSWORD or a "
    "prompt."))
audit_app = typer.Typer(no_args_is_help=True, **_TYPER_SAFE, help=(
    "Compliance officer: verify and export a site's tamper-evident audit log. Password "
    "(export, requests): FEDSYFT_OFFICER_PASSWORD or a prompt."))
site_app = typer.Typer(no_args_is_help=True, **_TYPER_SAFE, help=(
    "Data owner: maintain the site directory. Password: FEDSYFT_OWNER_PASSWORD or a prompt."))
app.add_typer(requests_app, name="requests")
app.add_typer(audit_app, name="audit")
app.add_typer(site_app, name="site")

SITE = typer.Option(..., "--site", help="The site's directory (e.g. from demo --keep-sites), "
                                        "or with --config the site's name.")
CONFIG_OPT = typer.Option(None, "--config", help="A running federation's federation.toml: "
                                                 "act on the site's server.")
OWNER = typer.Option(None, "--owner", help="Data owner's email [default: from site.json].")
OFFICER = typer.Option(None, "--officer", help="Officer's email [default: from officer.json].")
PUBLIC_KEY = typer.Option(None, "--public-key", help="The site's audit public key (PEM), "
                                                     "obtained out of band [default: the "
                                                     "directory's audit_key.pub].")


def _fail(message: object, code: int = 2) -> typer.Exit:
    """Print one line on stderr; the caller raises the returned Exit."""
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _password(env_var: str, who: str) -> str:
    """From the environment, else an interactive prompt: never argv, never a file. Held as
    a :class:`datasites.governance.accounts.Secret`, whose repr hides it."""
    from datasites.governance.accounts import Secret, password_from_env

    value = password_from_env(env_var)
    if value:
        return value
    # one attempt, never a loop: a closed or empty stdin (CI, pipes) must fail, not hang
    try:
        if sys.stdin is not None and sys.stdin.isatty():
            value = getpass.getpass(f"password of {who}: ")
        else:
            console.print(f"password of {who}: ", end="", markup=False, highlight=False)
            value = (sys.stdin.readline() if sys.stdin is not None else "").rstrip("\r\n")
    except (EOFError, KeyboardInterrupt, OSError):
        value = ""
    if not value:
        raise _fail(f"no password for {who}: set {env_var} or run interactively")
    return Secret(value)


def _site_info(site: Path) -> Any:
    from datasites.runtime.site_files import SiteDirectoryError, read_site_info

    _not_a_file(site)
    try:
        return read_site_info(site)
    except SiteDirectoryError as exc:
        raise _fail(exc) from None


class _OpenSite:
    """``with _OpenSite(dir, owner) as site``: reopen as the data owner, always close."""

    def __init__(self, site_dir: Path, owner: str | None, repair: bool = False) -> None:
        self.site_dir, self.owner, self.repair, self.site = site_dir, owner, repair, None

    def __enter__(self) -> Any:
        from datasites.governance.audit import verify

        info = _site_info(self.site_dir)
        report = verify(self.site_dir)  # before syft starts: a broken log opens nothing
        if not report.ok:
            raise _fail(f"site {info.name!r}: its audit log is corrupt, refusing to open the "
                        f"site: {report.problem}")
        email = self.owner or info.email("data_owner")
        password = _password("FEDSYFT_OWNER_PASSWORD", f"data owner {email} of {info.name}")
        from datasites.runtime.datasite import Datasite  # imports syft (~7 s)

        try:
            self.site = Datasite.open(self.site_dir, email, password, repair=self.repair)
        except (PermissionError, LookupError, ValueError, RuntimeError) as exc:
            raise _fail(exc) from None
        return self.site

    def __exit__(self, *exc: object) -> None:
        if self.site is not None:
            self.site.close()


def _owner_action(site_dir: Path, owner: str | None, action: Any,
                  config: Path | None = None) -> None:
    """Run ``action(site)`` on the reopened site, or with ``config`` on the site's running
    server (``--site`` is then the site's name); owner-side errors exit 2 in one line."""
    if config is not None:
        from datasites.cli.deploy import owner_client

        site = owner_client(config, str(site_dir), owner)
        try:
            action(site)
        except (PermissionError, LookupError, ValueError, RuntimeError) as exc:
            raise _fail(exc) from None
        return
    with _OpenSite(site_dir, owner) as site:
        try:
            action(site)
        except (PermissionError, LookupError, ValueError, RuntimeError) as exc:
            raise _fail(exc) from None


@requests_app.command("list")
def requests_list(site: Path = SITE, owner: str = OWNER, config: Path = CONFIG_OPT) -> None:
    """Every request at the site: id, job, requester, status."""
    def show(ds: Any) -> None:
        rows = ds.requests()
        if not rows:
            _say(f"no requests at {ds.name}")
            return
        _say(f"{len(rows)} request(s) at {ds.name}:")
        _say(f"{'request':<32}  {'status':<8}  {'job':<8}  requester")
        for r in rows:
            job = r.job_id or f"(not a fedsyft job: {r.function})"
            _say(f"{r.request_id:<32}  {r.status:<8}  {job:<8}  {r.requester}")

    _owner_action(site, owner, show, config)


@requests_app.command("show")
def requests_show(request_id: str = typer.Argument(..., help="Request id (or a prefix)."),
                  site: Path = SITE, owner: str = OWNER, config: Path = CONFIG_OPT) -> None:
    """A request in plain words, then its code."""
    def show(ds: Any) -> None:
        review = ds.review(request_id)
        _say(review.plain_words())
        _say("\n--- code ---")
        _say(review.code)

    _owner_action(site, owner, show, config)


@requests_app.command("approve")
def requests_approve(request_id: str = typer.Argument(..., help="Request id (or a prefix)."),
                     site: Path = SITE, owner: str = OWNER, config: Path = CONFIG_OPT,
                     reason: str = typer.Option("", "--reason", help="Why (for the record).")
                     ) -> None:
    """Approve a request (only the exact fedsyft template can be approved)."""
    def act(ds: Any) -> None:
        review = ds.approve(request_id, reason=reason)
        _say(review.plain_words().splitlines()[0])
        _say(f"approved at {ds.name} by {ds.operator.email}")

    _owner_action(site, owner, act, config)


@requests_app.command("deny")
def requests_deny(request_id: str = typer.Argument(..., help="Request id (or a prefix)."),
                  site: Path = SITE, owner: str = OWNER, config: Path = CONFIG_OPT,
                  reason: str = typer.Option(..., "--reason",
                                             help="Why; the data scientist reads it.")) -> None:
    """Deny a request, or revoke an approved one."""
    def act(ds: Any) -> None:
        ds.deny(request_id, reason)
        _say(f"request {request_id} denied at {ds.name} by {ds.operator.email}: {reason}")

    _owner_action(site, owner, act, config)


@site_app.command("repair")
def site_repair(site: Path = SITE, owner: str = OWNER) -> None:
    """Rebuild privacy_ledger.json and policy.json from the site's verified audit log.

    A site whose ledger or policy file is missing or disagrees with the signed log refuses
    to open; this rebuilds both from the log's budget charges and policy changes, logs
    ``site_state_rebuilt``, and then opens (and closes) the site. Data owner only.
    """
    with _OpenSite(site, owner, repair=True) as ds:
        if not ds.repaired:
            _say(f"site {ds.name!r}: the privacy ledger and the policy agree with the signed "
                 "audit log; nothing to repair")
            return
        for name, problems in ds.repaired.items():
            _say(f"site {ds.name!r}: rebuilt {name} from the signed audit log "
                 f"({'; '.join(problems)})")
        from datasites.governance.policy import DATASET_NAME

        spent = ds.guard.privacy.ledger.spent(DATASET_NAME)
        _say(f"site {ds.name!r}: dataset {DATASET_NAME!r} has spent epsilon {spent:.6g} of its "
             f"budget {ds.policy().epsilon_budget:g}; the repair is in the audit log")


# ---- compliance officers: the audit log ------------------------------------------------------
def _not_a_file(site: Path) -> None:
    """A --site that is a file is named as such, not as a directory that does not exist."""
    if site.exists() and not site.is_dir():
        raise _fail(f"--site {site} is a file, not a site directory")


def _audit_dir(site: Path) -> Path:
    _not_a_file(site)
    if not site.is_dir():
        raise _fail(f"site directory {site} does not exist")
    if not (site / "audit.jsonl").exists() and not (site / "audit.head.json").exists():
        raise _fail(f"{site} holds no fedsyft audit log (no audit.jsonl)")
    return site


def _officer_session(site: Path, officer: str | None, public_key: Path | None) -> Any:
    from datasites.errors import AuthenticationError
    from datasites.governance.compliance import AuditorSession
    from datasites.runtime.site_files import SiteDirectoryError, officer_email

    info = _site_info(site)
    try:
        email = officer or officer_email(site)
    except SiteDirectoryError as exc:
        raise _fail(exc) from None
    password = _password("FEDSYFT_OFFICER_PASSWORD", f"compliance officer {email} of "
                                                     f"{info.name}")
    try:
        return AuditorSession.login(site, email, password, public_key=public_key)
    except (AuthenticationError, SiteDirectoryError) as exc:
        raise _fail(exc) from None


@contextlib.contextmanager
def _log_copy(config: Path, site: str, officer: str | None, purpose: str
              ) -> Iterator[tuple[Path, str]]:
    """(directory, officer e-mail): a copy of ``site``'s log fetched from its running server
    (``--config``), in a private temporary directory removed afterwards; one-line errors."""
    from datasites.cli.deploy import member_login
    from datasites.deploy.officer import OfficerClient, OfficerError
    from datasites.deploy.processes import ServerError
    from datasites.governance.audit import AuditError

    member, email, password = member_login(config, site, "officer", officer)
    with tempfile.TemporaryDirectory(prefix=f"fedsyft-audit-{member.name}-") as tmp:
        try:
            copy = OfficerClient(member, email, password).copy(purpose, Path(tmp) / member.name)
        except (OfficerError, ServerError, AuditError) as exc:
            raise _fail(exc) from None
        yield copy, email


RECEIPTS = typer.Option(None, "--receipts", help=(
    "JSON-lines file of receipts (signed audit heads that came with the site's replies): "
    "also check that the log still holds the history each receipt of this site attests."))


@audit_app.command("verify")
def audit_verify(site: Path = SITE, public_key: Path = PUBLIC_KEY,
                 receipts: Path = RECEIPTS, config: Path = CONFIG_OPT,
                 officer: str = OFFICER) -> None:
    """Check the hash chain and signed head: exit 0 if intact, 1 naming where it breaks.

    With --receipts, exit 1 also names the first receipt the log no longer matches (a
    history rewritten and re-signed with the site's own key); a bad receipts file exits 2.
    With --config, the running server sends a copy of its log (officer login) and it is
    checked here.
    """
    if config is not None:
        with _log_copy(config, str(site), officer, "verify") as (copy, _):
            _verify(copy, public_key, receipts, label=f"site {site} (a copy from its server)")
        return
    _verify(site, public_key, receipts)


def _verify(site: Path, public_key: Path | None, receipts: Path | None,
            label: str | None = None) -> None:
    from datasites.governance.audit import AuditError, verify

    where_log = label or str(site)
    _audit_dir(site)
    try:
        report = verify(site, public_key)
    except AuditError as exc:
        raise _fail(exc) from None
    if not report.ok:
        where = "" if report.first_bad_seq is None else f" at entry {report.first_bad_seq}"
        raise _fail(f"audit log in {where_log} is BROKEN{where}: {report.problem}", code=1)
    if receipts is None:
        _say(f"audit log in {where_log}: {report.entries} entries, hash chain intact, head "
             "signature valid")
        return
    _say(_receipts_verdict(site, receipts, public_key))


def _receipts_verdict(site: Path, receipts: Path, public_key: Path | None) -> str:
    """The success line of ``audit verify --receipts``; a mismatch exits 1, bad input 2."""
    from datasites.governance.audit import AuditError
    from datasites.governance.receipts import check_receipts, load_receipts

    try:
        result = check_receipts(site, load_receipts(receipts), public_key)
    except AuditError as exc:
        raise _fail(exc) from None
    if not result.ok:
        assert result.receipt is not None
        raise _fail(f"audit log in {site} does not match {result.receipt.describe()} in "
                    f"{receipts}: {result.problem}", code=1)
    return (f"audit log in {site}: hash chain intact, head signature valid, and it matches "
            f"all {result.checked} receipt(s) of site {result.site} in {receipts} (up to "
            f"entry {result.latest_seq})")


@audit_app.command("export")
def audit_export(site: Path = SITE,
                 fmt: str = typer.Option(..., "--format", help="json, csv or html."),
                 out: Path = typer.Option(..., "--out", help="File to write."),
                 officer: str = OFFICER, public_key: Path = PUBLIC_KEY,
                 config: Path = CONFIG_OPT) -> None:
    """Export the log (the officer's read, itself logged); a broken log exports but exits 1.
    With --config, from a copy the running server sends (logged there as it leaves)."""
    from datasites.governance.audit import AuditError
    from datasites.governance.audit_report import FORMATS

    if fmt not in FORMATS:
        raise _fail(f"unknown format {fmt!r}; use one of {', '.join(sorted(FORMATS))}")
    _check_output(out, "--out", create_parents=False)
    if config is not None:
        with _log_copy(config, str(site), officer, "export") as (copy, _):
            _export_copy(copy, str(site), fmt, out, public_key)
        return
    _audit_dir(site)
    session = _officer_session(site, officer, public_key)
    try:
        path = session.export(fmt, out)  # logged only once the file is written
    except OSError as exc:
        raise _fail(f"cannot write the export to --out {out}: {exc.strerror or exc}; "
                    "nothing was logged") from None
    try:
        report = session.verify()
    except AuditError as exc:
        raise _fail(exc) from None
    if session.not_recorded:
        err.print(f"warning: exported to {path}, but the export could not be logged in the "
                  f"site's audit log: {session.not_recorded}", markup=False, highlight=False,
                  soft_wrap=True)
    if not report.ok:
        raise _fail(f"exported to {path}, but the audit log is BROKEN: {report.problem}", 1)
    _say(f"exported {report.entries} verified entries of site {session.site} to {path}")


def _export_copy(copy: Path, site: str, fmt: str, out: Path, public_key: Path | None) -> None:
    from datasites.governance.audit import AuditError, verify
    from datasites.governance.audit_report import export

    try:
        path = export(copy, fmt, out, public_key=public_key)
        report = verify(copy, public_key)
    except OSError as exc:
        raise _fail(f"cannot write the export to --out {out}: {exc.strerror or exc}") from None
    except AuditError as exc:
        raise _fail(exc) from None
    if not report.ok:
        raise _fail(f"exported to {path}, but the audit log is BROKEN: {report.problem}", 1)
    _say(f"exported {report.entries} verified entries of site {site} to {path}")


def _period(since: str | None, until: str | None) -> None:
    """Refuse, before the officer logs in, a time that is not ISO-8601 with a zone, and a
    --since that is not before --until (an empty period would list nothing, silently)."""
    times = {}
    for flag, value in (("--since", since), ("--until", until)):
        if value is None:
            continue
        try:
            times[flag] = datetime.fromisoformat(value)
        except ValueError:
            raise _fail(f"{flag} {value!r} is not an ISO-8601 time (e.g. "
                        "2025-01-01T00:00:00+00:00)") from None
        if times[flag].tzinfo is None:
            raise _fail(f"{flag} {value} has no timezone (add +00:00 for UTC)")
    if len(times) == 2 and times["--since"] >= times["--until"]:
        raise _fail(f"--since {since} is not before --until {until}: the period is empty")


@audit_app.command("requests")
def audit_requests(site: Path = SITE, officer: str = OFFICER,
                   since: str = typer.Option(None, help="ISO time with zone, e.g. "
                                                        "2025-01-01T00:00:00+00:00."),
                   until: str = typer.Option(None, help="ISO time with zone (exclusive)."),
                   public_key: Path = PUBLIC_KEY, config: Path = CONFIG_OPT) -> None:
    """Who asked for what, who decided and why, what ran and what left (officer only).
    With --config, from a copy the running server sends."""
    _period(since, until)
    if config is not None:
        from datasites.governance.compliance import AuditorSession
        from datasites.runtime.site_files import SiteDirectoryError, read_site_info

        with _log_copy(config, str(site), officer, "requests") as (copy, email):
            try:
                info = read_site_info(copy)
            except SiteDirectoryError as exc:
                raise _fail(exc) from None
            _list_requests(AuditorSession(info, email, public_key), str(site), since, until)
        return
    _audit_dir(site)
    _list_requests(_officer_session(site, officer, public_key), site, since, until)


def _list_requests(session: Any, site: Path | str, since: str | None,
                   until: str | None) -> None:
    from datasites.governance.audit import AuditError

    try:
        report = session.verify()
        if not report.ok:  # a tampered log's records are not evidence: list nothing
            where = "" if report.first_bad_seq is None else f" at entry {report.first_bad_seq}"
            raise _fail(f"audit log in {site} is BROKEN{where}: {report.problem}; nothing "
                        "listed (`fedsyft audit export` still keeps the evidence)", code=1)
        records = session.requests(since=since, until=until)
    except AuditError as exc:
        raise _fail(exc) from None
    for rec in records:
        _say(rec.describe())
    if not records:
        _say(f"no requests recorded at {session.site} in that period")


import datasites.cli.deploy  # noqa: E402,F401 - registers init/up/down/status/...


def main() -> None:
    app()


if __name__ == "__main__":  # `python -m datasites.cli.main`: the commands live on the module
    from datasites.cli.main import main as installed_main  # the deploy commands registered on

    installed_main()
