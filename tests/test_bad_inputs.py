"""Bad input, table-driven: tables, options, configs and damaged site directories.

Each case runs the real CLI (typer's runner in-process, a few as a real subprocess) and
must give exit code 2 (1 where a log's chain is broken, as ``audit verify`` does), exactly
one line on stderr naming the problem, no traceback and no password; a damaged site
directory must be left byte for byte as it was. ``demo`` cases fail before any site is
provisioned: they run with ``--keep-sites`` and no site directory may appear. ONE small
site is provisioned for the module and copied per damaged case.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from datasites.cli.main import app
from fed_tasks.spec import NO_DP_MODELS

BIN = Path(sys.executable).parent / "fedsyft"
NAME = "bad-input-clinic"
OWNER_PW = "owner-pass-5521"
OFFICER_PW = "officer-pass-7730"
ENV = {"FEDSYFT_OWNER_PASSWORD": OWNER_PW, "FEDSYFT_OFFICER_PASSWORD": OFFICER_PW}


def _cli(args: list[str], env: dict[str, str | None] | None = None, input: str | None = None):
    return CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args],
                                              env={**ENV, **(env or {})}, input=input)


def _assert_one_line(code: int, stdout: str, stderr: str, expected: int, needle: str,
                     secrets: tuple[str, ...] = ()) -> str:
    assert code == expected, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr
    for secret in (OWNER_PW, OFFICER_PW, *secrets):
        assert secret not in stdout + stderr
    return lines[0]


# ---- tables: `fedsyft demo --data FILE` ------------------------------------------------------
def _frame(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"f1": rng.normal(size=rows), "f2": rng.normal(size=rows),
                         "f3": rng.normal(size=rows),
                         "anomaly": (np.arange(rows) % 10 == 0).astype(int)})


def _csv(frame: pd.DataFrame) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        frame.to_csv(tmp / "t.csv", index=False)
        return tmp / "t.csv"
    return write


def _text(text: str | bytes, name: str = "t.csv") -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        data = text.encode() if isinstance(text, str) else text
        (tmp / name).write_bytes(data)
        return tmp / name
    return write


def _with(**changes: object) -> pd.DataFrame:
    frame = _frame()
    for column, value in changes.items():
        frame[column] = value
    return frame


def _one(column: str, value: object) -> pd.DataFrame:
    frame = _frame().astype({column: object})
    frame.loc[7, column] = value
    return frame


def _huge() -> pd.DataFrame:
    frame = _frame()
    frame.loc[3, "f2"] = 3e200
    return frame


def _wide(tmp: Path) -> Path:
    cols = [f"c{i}" for i in range(10_001)]
    pd.DataFrame(np.arange(3 * len(cols)).reshape(3, -1), columns=cols).to_csv(
        tmp / "t.csv", index=False)
    return tmp / "t.csv"


def _gzip_truncated(tmp: Path) -> Path:
    data = gzip.compress(_frame().to_csv(index=False).encode())
    (tmp / "t.csv.gz").write_bytes(data[: len(data) // 2])
    return tmp / "t.csv.gz"


def _missing(tmp: Path) -> Path:
    return tmp / "nowhere.csv"


def _directory(tmp: Path) -> Path:
    (tmp / "table.csv").mkdir()
    return tmp / "table.csv"


DUPLICATE = "f1,f2,f1,anomaly\n" + "".join(f"{i},{i % 7},{-i},{int(i % 10 == 0)}\n"
                                           for i in range(300))

# id -> (write the table, extra demo args, what the one line must say)
TABLES: dict[str, tuple[Callable[[Path], Path], list[str], str]] = {
    "missing-file": (_missing, [], "table file not found"),
    "directory": (_directory, [], "is a directory, not a CSV file"),
    "empty-file": (_text(""), [], "is empty"),
    "header-only": (_text("f1,f2,anomaly\n"), [], "has no rows"),
    "binary-garbage": (_text(bytes(range(256)) * 8), [], "not a readable CSV"),
    "corrupt-gzip": (_text(b"\x1f\x8b\x08\x00garbage" * 50, "t.csv.gz"), [],
                     "not a readable compressed CSV"),
    "truncated-gzip": (_gzip_truncated, [], "not a readable compressed CSV"),
    "non-numeric": (_csv(_with(f2=["a", "b", "c"] * 100)), [],
                    "feature columns ['f2'] are not numeric"),
    "categorical": (_csv(_with(ward=["icu", "er"] * 150, note="x")), [],
                    "['ward', 'note'] are not numeric (categorical, text or boolean); drop "
                    "them with --drop-columns ward,note"),
    "boolean": (_csv(_with(f2=[True, False] * 150)), [], "--drop-columns f2"),
    "all-constant": (_csv(_with(f1=1.5, f2=0, f3=2)), [],
                     "every feature column is constant over the whole input ['f1', 'f2', 'f3']"),
    "drop-unknown-column": (_csv(_frame()), ["--drop-columns", "f2,ward"],
                            "--drop-columns ['ward'] are not columns of the table"),
    "drop-the-label": (_csv(_frame()), ["--drop-columns", "anomaly"],
                       "--drop-columns names the label column 'anomaly'"),
    "drop-every-feature": (_csv(_frame()), ["--drop-columns", "f1,f2,f3"],
                           "no feature columns besides the label and the dropped columns"),
    "nan": (_csv(_one("f1", np.nan)), [], "first in column 'f1' at row 7"),
    "inf": (_csv(_one("f3", np.inf)), [], "first in column 'f3' at row 7"),
    "duplicate-columns": (_text(DUPLICATE), [], "duplicate column names ['f1']"),
    "one-class-label": (_csv(_with(anomaly=0)), [], "label column 'anomaly' holds only 0"),
    "label-not-binary": (_csv(_with(anomaly=[0, 2] * 150)), [], "must hold only 0 and 1"),
    "label-nan": (_csv(_one("anomaly", np.nan)), [], "must hold only 0 and 1"),
    "too-few-rows": (_csv(_frame(25)), [], "25 rows, fewer than the 3 sites need"),
    "too-few-for-sites": (_csv(_frame(150)), ["--sites", "20"],
                          "150 rows, fewer than the 20 sites need"),
    "huge-values": (_csv(_huge()), [], "feature columns ['f2'] hold values above 1e+150"),
    "very-wide": (_wide, [], "10,001 columns, more than the limit of 10,000"),
    "wrong-label-name": (_csv(_frame()), ["--label-column", "target"],
                         "label column 'target' not in"),
    "semicolons": (_text("f1;f2;anomaly\n1;2;0\n3;4;1\n"), [], "label column 'anomaly' not in"),
    "label-only": (_csv(_frame()[["anomaly"]]), [], "no feature columns besides the label"),
}


@pytest.mark.parametrize("case", sorted(TABLES))
def test_bad_table_is_one_line_before_any_site(case, tmp_path):
    write, extra, needle = TABLES[case]
    data, kept = write(tmp_path), tmp_path / "kept"
    result = _cli(["demo", "--data", data, "--keep-sites", kept, "--rounds", "1", *extra])
    _assert_one_line(result.exit_code, result.stdout, result.stderr, 2, needle)
    assert not kept.exists() or not any(kept.iterdir()), "a site was provisioned"


def _tables(*frames: pd.DataFrame) -> Callable[[Path], list[Path]]:
    def write(tmp: Path) -> list[Path]:
        for i, frame in enumerate(frames):
            frame.to_csv(tmp / f"site{i + 1}.csv", index=False)
        return [tmp / f"site{i + 1}.csv" for i in range(len(frames))]
    return write


# id -> (write one table per site, extra demo args, what the one line must say)
MULTI: dict[str, tuple[Callable[[Path], list[Path]], list[str], str]] = {
    "renamed-column": (_tables(_frame(), _frame(seed=1).rename(columns={"f3": "g3"})), [],
                       "site2.csv does not have the columns of "),
    "missing-column": (_tables(_frame(), _frame(), _frame(seed=1).drop(columns="f2")), [],
                       "site3.csv does not have the columns of"),
    "text-in-one-table": (_tables(_frame(), _with(f2=["a", "b", "c"] * 100)), [],
                          "site2.csv: feature columns ['f2'] are not numeric"),
    # one table with one class is a site whose own ROC-AUC is "-"; all of them: refused
    "one-class-everywhere": (_tables(_with(anomaly=0), _with(anomaly=0)), [],
                             "label column 'anomaly' holds only 0 (one class)"),
    "nan-in-one-table": (_tables(_frame(), _one("f1", np.nan)), [],
                         "site2.csv: 1 NaN or infinite values, first in column 'f1' at row 7"),
    "too-few-rows": (_tables(_frame(), _frame(8)), [], "site2.csv has 8 rows, fewer than the 10"),
    "drop-unknown": (_tables(_frame(), _frame(seed=1)), ["--drop-columns", "ward"],
                     "--drop-columns ['ward'] are not columns"),
}


def _refused_before_any_site(case: tuple[Callable[[Path], list[Path]], list[str], str],
                              tmp_path: Path) -> None:
    """``demo`` on the tables ``case`` writes: one line naming the problem, exit 2, and no
    site provisioned."""
    write, args, needle = case
    kept = tmp_path / "kept"
    data = [a for path in write(tmp_path) for a in ("--data", path)]
    result = _cli(["demo", *data, "--keep-sites", kept, "--rounds", "1", *args])
    _assert_one_line(result.exit_code, result.stdout, result.stderr, 2, needle)
    assert not kept.exists() or not any(kept.iterdir()), "a site was provisioned"


@pytest.mark.parametrize("case", sorted(MULTI))
def test_bad_tables_one_per_site_are_one_line_naming_the_file(case, tmp_path):
    _refused_before_any_site(MULTI[case], tmp_path)


# ---- series: `fedsyft demo --model lstm-ae --time-column t --data FILE` --------------------
def _series(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    """A 5-minute series: time as text, one value, a 0/1 label."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2024-03-01", periods=rows, freq="5min").strftime("%Y-%m-%d %H:%M:%S")
    return pd.DataFrame({"t": times, "value": rng.normal(size=rows),
                         "anomaly": (np.arange(rows) % 10 == 0).astype(int)})


def _series_with(row: int, value: object) -> pd.DataFrame:
    frame = _series()
    frame.loc[row, "t"] = value
    return frame


SERIES = ["--model", "lstm-ae", "--time-column", "t"]
# id -> (write the tables, demo args, what the one line must say)
SERIES_CASES: dict[str, tuple[Callable[[Path], list[Path]], list[str], str]] = {
    "not-a-time": (_tables(_series_with(7, "soon")), SERIES,
                   "time column 't': 'soon' at row 7 is not a date/time"),
    "empty-time": (_tables(_series_with(12, None)), SERIES, "at row 12 is not a date/time"),
    "same-time-twice": (_tables(_series_with(9, "2024-03-01 00:15:00")), SERIES,
                        "time column 't': rows 3 and 9 hold the same time"),
    "no-such-time-column": (_tables(_series()), ["--model", "lstm-ae", "--time-column", "ts"],
                            "time column 'ts' not in table"),
    "time-is-the-label": (_tables(_series().assign(t=np.arange(300))),
                          ["--model", "lstm-ae", "--time-column", "anomaly"],
                          "--time-column 'anomaly' is also the label column"),
    "time-dropped": (_tables(_series()), [*SERIES, "--drop-columns", "t"],
                     "--time-column 't' is also a dropped column"),
    "series-too-short-for-sites": (_tables(_series(150)), [*SERIES, "--sites", "3"],
                                   "series has 150 rows, fewer than the 3 sites need (64 "
                                   "consecutive rows per site"),
    "one-device-too-short": (_tables(_series(), _series(30, seed=1)), SERIES,
                             "site2.csv has 30 rows, fewer than the 64 (two windows)"),
    "devices-one-class": (_tables(_series().assign(anomaly=0), _series(seed=1).assign(anomaly=0)),
                          SERIES, "label column 'anomaly' holds only 0 (one class)"),
}


@pytest.mark.parametrize("case", sorted(SERIES_CASES))
def test_bad_series_is_one_line_before_any_site(case, tmp_path):
    _refused_before_any_site(SERIES_CASES[case], tmp_path)


def test_init_time_column_is_checked(tmp_path):
    _series_with(7, "soon").to_csv(tmp_path / "s.csv", index=False)
    for extra, needle in ((["--time-column", "t"], "'soon' at row 7 is not a date/time"),
                          (["--time-column", "when"], "time column 'when' not in table"),
                          (["--time-column", ""], "--time-column: give the name")):
        result = _cli(["init", tmp_path / "fed", "--data", tmp_path / "s.csv", *extra])
        _assert_one_line(result.exit_code, result.stdout, result.stderr, 2, needle)
        assert not (tmp_path / "fed" / "federation.toml").exists()


# ---- options: `fedsyft demo`, `fedsyft` ------------------------------------------------------
def _options_cases() -> dict[str, tuple[list[str], str]]:
    eps = ["--epsilon", "1"]
    return {
        "sites-0": (["--sites", "0"], "--sites: 0 is out of range (allowed: 2 to 20)"),
        "sites-1": (["--sites", "1"], "--sites: 1 is out of range (allowed: 2 to 20)"),
        "sites-negative": (["--sites", "-1"], "--sites: -1 is out of range"),
        "sites-10000": (["--sites", "10000"], "--sites: 10000 is out of range"),
        "sites-text": (["--sites", "three"], "--sites: 'three' is not a valid integer"),
        "rounds-0": (["--rounds", "0"], "--rounds: 0 is out of range (allowed: 1 to 100)"),
        "rounds-negative": (["--rounds", "-1"], "--rounds: -1 is out of range"),
        "rounds-101": (["--rounds", "101"], "--rounds: 101 is out of range"),
        "rounds-100000": (["--rounds", "100000"], "--rounds: 100000 is out of range"),
        "epsilon-0": (["--epsilon", "0"], "--epsilon: 0.0 is out of range (allowed: above 0"),
        "epsilon-negative": (["--epsilon", "-1"], "--epsilon: -1.0 is out of range"),
        "epsilon-nan": (["--epsilon", "nan"], "--epsilon: nan is not a finite number (allowed"),
        "epsilon-inf": (["--epsilon", "inf"], "--epsilon: inf is out of range"),
        "epsilon-above-budget": (["--epsilon", "11"], "at most 10)"),
        "delta-0": ([*eps, "--delta", "0"], "--delta: 0.0 is out of range"),
        "delta-1": ([*eps, "--delta", "1"], "--delta: 1.0 is out of range"),
        "delta-2": ([*eps, "--delta", "2"], "(allowed: above 0, at most 1e-05)"),
        "delta-nan": ([*eps, "--delta", "nan"], "--delta: nan is not a finite number"),
        "delta-without-epsilon": (["--delta", "1e-6"], "need --epsilon"),
        "clip-0": ([*eps, "--clip", "0"], "--clip: 0.0 is out of range (allowed: above 0)"),
        "clip-negative": ([*eps, "--clip", "-1"], "--clip: -1.0 is out of range"),
        "clip-nan": ([*eps, "--clip", "nan"], "--clip: nan is not a finite number"),
        "dp-sgd-without-epsilon": (["--dp-sgd"], "need --epsilon"),
        "seed-negative": (["--seed", "-1"], "--seed: -1 is out of range (allowed: 0 to"),
        "seed-2**70": (["--seed", str(2**70)], f"--seed: {2**70} is out of range"),
        "aggregation-bogus": (["--aggregation", "bogus"],
                              "--aggregation: 'bogus' is not a choice (allowed: plain, "
                              "paillier, secagg)"),
        "model-bogus": (["--model", "gan"], "--model: 'gan' is not a choice (allowed: ae, vae, "
                        "deepsvdd, lstm-ae, pca, hbos, iforest, auto)"),
        "strategy-bogus": (["--strategy", "fedsgd"], "--strategy: 'fedsgd' is not a choice"),
        **{f"{s}-secagg": (["--strategy", s, "--aggregation", "secagg"],
                           f"--strategy '{s}' needs every site's update in clear")
           for s in ("median", "trimmed-mean", "krum")},
        "async-dp": (["--async", "2", *eps], "--async is not available with differential "
                     "privacy"),
        "async-above-sites": (["--async", "4", "--sites", "3"],
                              "--async 4: a round's buffer takes 1 to --sites (3) updates"),
        "async-krum": (["--async", "3", "--strategy", "krum"],
                       "--strategy 'krum' does not average"),
        "async-pca": (["--async", "2", "--model", "pca"],
                      "--async buffers training --rounds; --model 'pca' has none"),
        "strategy-with-pca": (["--strategy", "fedprox", "--model", "pca"],
                              "--strategy 'fedprox' combines training --rounds; --model 'pca' "
                              "has none"),
        "scaffold-epsilon": (["--strategy", "scaffold", *eps],
                             "strategy 'scaffold' sends control variates that no site can "
                             "noise yet"),
        "auto-epsilon": (["--model", "auto", *eps], "--model 'auto' is not available with "
                         "differential privacy yet"),
        "compress-bogus": (["--compress", "zip"], "--compress: must be none, q8, q16 or "
                           "topk:K (K a whole number from 1) (got 'zip')"),
        "compress-topk-0": (["--compress", "topk:0"], "--compress: must be none, q8, q16"),
        "compress-topk-secagg": (["--compress", "topk:5", "--aggregation", "secagg"],
                                 "--compress 'topk:5' sends a sparse update, which 'secagg' "
                                 "cannot add (a secure sum needs dense vectors)"),
        "compress-pca": (["--compress", "q8", "--model", "pca"],
                         "--model 'pca' has no training --rounds"),
        "compress-epsilon": (["--compress", "q16", *eps],
                             "--compress is not available with differential privacy yet"),
        "personalize-negative": (["--personalize", "-1"],
                                 "--personalize: -1 is out of range (allowed: 0 to 100)"),
        "personalize-pca": (["--personalize", "2", "--model", "hbos"],
                            "personalization fine-tunes a --model trained in --rounds"),
        "series-model-without-time-column": (["--model", "lstm-ae"],
                                             "--model lstm-ae reads each site's series in time "
                                             "order: name the table's time column with "
                                             "--time-column"),
        "time-column-with-a-row-model": (["--time-column", "timestamp"],
                                         "--time-column orders the rows of a series model "
                                         "(lstm-ae); --model ae scores rows independently"),
        "time-column-with-pca": (["--model", "pca", "--time-column", "t"],
                                 "--model pca scores rows independently"),
        "time-column-empty": (["--model", "lstm-ae", "--time-column", " "],
                              "--time-column: give the name of the table's time column"),
        "time-column-no-value": (["--time-column"], "'--time-column' requires an argument"),
        "lstm-ae-dp-sgd": (["--model", "lstm-ae", "--time-column", "t", *eps, "--dp-sgd"],
                           "available for --model 'ae' only"),
        "iforest-secagg": (["--model", "iforest", "--aggregation", "secagg"],
                           "--model 'iforest' pools each site's trees"),
        "iforest-paillier": (["--model", "iforest", "--aggregation", "paillier"],
                             "use --aggregation 'plain'"),
        **{f"{m}-epsilon": (["--model", m, *eps], f"--model '{m}' releases sums that no site "
                            "can noise yet") for m in NO_DP_MODELS},
        "vae-dp-sgd": (["--model", "vae", *eps, "--dp-sgd"], "available for --model 'ae' only"),
        "target-fpr-0": (["--target-fpr", "0"],
                         "--target-fpr: 0.0 is out of range (allowed: above 0, below 0.5)"),
        "target-fpr-half": (["--target-fpr", "0.5"], "--target-fpr: 0.5 is out of range"),
        "target-fpr-negative": (["--target-fpr", "-0.1"], "--target-fpr: -0.1 is out of range"),
        "target-fpr-nan": (["--target-fpr", "nan"], "--target-fpr: nan is not a finite number"),
        "target-fpr-text": (["--target-fpr", "low"], "--target-fpr: 'low' is not a valid number"),
        "patience-negative": (["--patience", "-1"],
                              "--patience: -1 is out of range (allowed: 0 to 100)"),
        "patience-101": (["--patience", "101"], "--patience: 101 is out of range"),
        "patience-text": (["--patience", "some"], "--patience: 'some' is not a valid integer"),
        "drop-columns-empty-name": (["--drop-columns", "f1,,f2"],
                                    "--drop-columns: 'f1,,f2' has an empty column name"),
        "drop-columns-no-value": (["--drop-columns"], "'--drop-columns' requires an argument"),
        "data-twice": (["--data", "{tmp}/good.csv", "--data", "{tmp}/good.csv"],
                       "is given twice (one table per site)"),
        "data-and-sites-disagree": (["--data", "{tmp}/good.csv", "--data", "{tmp}/file.txt",
                                     "--sites", "3"],
                                    "--sites 3 does not match the 2 --data tables"),
        "data-21-tables": ([a for i in range(21) for a in ("--data", f"{{tmp}}/t{i}.csv")],
                           "--data: 21 tables, one site each, is more than 20 sites"),
        "unknown-flag": (["--sitez", "3"], "no such option --sitez (did you mean --sites"),
        "extra-argument": (["surplus"], "unexpected extra argument (surplus)"),
        "report-is-directory": (["--report", "{tmp}"], "is a directory; give a file name"),
        "report-under-a-file": (["--report", "{tmp}/file.txt/r.json"], "is not a directory"),
        "keep-sites-not-empty": (["--keep-sites", "{tmp}"], "must be an empty or new directory"),
        "keep-sites-a-file": (["--keep-sites", "{tmp}/file.txt"],
                              "must be an empty or new directory"),
        "label-column-missing": (["--data", "{tmp}/good.csv", "--label-column", "label"],
                                 "label column 'label' not in"),
        "label-column-no-value": (["--label-column"], "'--label-column' requires an argument"),
    }


OPTIONS = _options_cases()


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_bad_demo_option_names_the_flag_and_range(case, tmp_path):
    args, needle = OPTIONS[case]
    (tmp_path / "file.txt").write_text("x")
    _frame().to_csv(tmp_path / "good.csv", index=False)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = _cli(["demo", *args])
    _assert_one_line(result.exit_code, result.stdout, result.stderr, 2, needle)


def test_init_drop_columns_are_checked(tmp_path):
    _frame().assign(ward="icu").to_csv(tmp_path / "t.csv", index=False)
    for extra, needle in (([], "drop them with --drop-columns ward"),
                          (["--drop-columns", "ward,nope"], "--drop-columns ['nope'] are not"),
                          (["--drop-columns", ",ward"], "has an empty column name")):
        result = _cli(["init", tmp_path / "fed", "--data", tmp_path / "t.csv", *extra])
        _assert_one_line(result.exit_code, result.stdout, result.stderr, 2, needle)
        assert not (tmp_path / "fed" / "federation.toml").exists()


def test_root_errors_are_one_line():
    for args, needle in ((["--bogus"], "no such option --bogus"),
                         (["frobnicate"], "No such command 'frobnicate'")):
        result = _cli(args)
        _assert_one_line(result.exit_code, result.stdout, result.stderr, 2, needle)


def test_a_weak_password_is_refused_and_never_shown(tmp_path):
    weak = "abc"
    result = _cli(["demo", "--keep-sites", tmp_path / "kept"],
                  env={"FEDSYFT_OWNER_PASSWORD": weak})
    line = _assert_one_line(result.exit_code, result.stdout, result.stderr, 2,
                            "FEDSYFT_OWNER_PASSWORD")
    assert f" {weak} " not in f" {line} " and not (tmp_path / "kept").exists()


def test_cli_ranges_match_what_the_job_and_the_policy_accept():
    from datasites.cli import job_options as opts
    from datasites.governance.policy import DatasetPolicy
    from fed_tasks.spec import JobSpec

    policy = DatasetPolicy()
    assert opts.SITES_MIN == policy.min_sites
    assert opts.ROUNDS_MAX == policy.max_rounds <= _bound(JobSpec, "rounds", "le")
    assert opts.ROUNDS_MIN == _bound(JobSpec, "rounds", "ge")
    assert opts.EPSILON_MAX == policy.epsilon_budget and opts.DELTA_MAX == policy.max_delta
    from fed_tasks.detectors import REGISTRY
    from fed_tasks.spec import SERIES_MODELS

    assert set(opts.MODELS) == {*REGISTRY, "auto"} and set(SERIES_MODELS) <= set(opts.MODELS)
    # "auto" is allowed where its candidates are (DatasetPolicy.violations checks each)
    assert set(opts.MODELS) - {"auto"} <= set(policy.allowed_models)
    assert opts.TARGET_FPR_MIN == _bound(JobSpec, "target_fpr", "gt")
    assert opts.TARGET_FPR_MAX == _bound(JobSpec, "target_fpr", "lt")
    assert 0 == _bound(JobSpec, "patience", "ge") and opts.PATIENCE_MAX <= _bound(
        JobSpec, "patience", "le")
    # the largest seed the CLI takes still seeds torch for the longest job
    import torch

    torch.Generator().manual_seed(opts.SEED_MAX * 100_003 + opts.ROUNDS_MAX)
    np.random.default_rng(opts.SEED_MAX)


def _bound(model: type, field: str, kind: str) -> object:
    return next(getattr(m, kind) for m in model.model_fields[field].metadata if hasattr(m, kind))


# ---- damaged site directories and bad owner / officer input ---------------------------------
@pytest.fixture(scope="module")
def clinic(partitions, schema, tmp_path_factory):
    """One provisioned, then closed, site with one pending request."""
    from datasites.adapter.scientist import ScientistSession
    from datasites.governance.accounts import Account, Role
    from datasites.runtime.datasite import Datasite
    from datasites.runtime.federation_config import ensure_signing_key, write_config
    from fed_tasks.spec import JobSpec

    directory = tmp_path_factory.mktemp("bad-input") / NAME
    scientist = Account("ds@uni.org", Role.DATA_SCIENTIST, "scientist-pass-17")
    train, test = partitions[0]
    site = Datasite.provision(NAME, directory, train=train, test=test, schema=schema,
                              scientist=scientist, owner_password=OWNER_PW,
                              officer_password=OFFICER_PW)
    admin_pw = site.accounts[Role.ADMIN].password
    write_config(directory, {"sites": {NAME: ensure_signing_key(directory)}, "max_sites": 1,
                             "min_sites": 2, "paillier_public_key": None,
                             "key_authority": None})
    session = ScientistSession(site.login(scientist.email, scientist.password))
    session.submit(JobSpec(features=schema.features, label_column=schema.label, rounds=1))
    site.requests()
    site.close()
    return SimpleNamespace(dir=directory, secrets=(admin_pw, scientist.password))


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file is the OS's, not the site's)."""
    if not root.is_dir():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()} if root.is_file() else {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "site.lock"}


def _edit_entry(d: Path) -> None:
    lines = (d / "audit.jsonl").read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[2])
    entry["actor"] = "mallory@evil.org"
    lines[2] = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
    (d / "audit.jsonl").write_bytes(b"".join(lines))


def _truncate_log(d: Path) -> None:
    data = (d / "audit.jsonl").read_bytes()
    (d / "audit.jsonl").write_bytes(data[: len(data) - 40])


def _write(name: str, data: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text(data)


def _delete(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _empty(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()


def _to_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_text("not a directory")


def _gone(d: Path) -> None:
    shutil.rmtree(d)


@dataclass(frozen=True)
class SiteCase:
    args: list[str]  # {site} is the damaged copy, {tmp} the test's directory
    needle: str
    damage: Callable[[Path], None] | None = None
    code: int = 2
    env: dict[str, str | None] | None = None
    unchanged: bool = True  # False: a wrong password is logged in the audit log, by design


LIST = ["requests", "list", "--site", "{site}"]
AUDIT_REQ = ["audit", "requests", "--site", "{site}"]
VERIFY = ["audit", "verify", "--site", "{site}"]
EXPORT = ["audit", "export", "--site", "{site}", "--format", "json"]
SITES: dict[str, SiteCase] = {
    "site-missing": SiteCase(LIST, "does not exist", _gone),
    "site-empty-dir": SiteCase(LIST, "not a fedsyft site directory", _empty),
    "site-is-a-file": SiteCase(LIST, "is a file, not a site directory", _to_file),
    "site-is-a-file-officer": SiteCase(VERIFY, "is a file, not a site directory", _to_file),
    "site-json-missing": SiteCase(LIST, "not a fedsyft site directory", _delete("site.json")),
    "site-json-corrupt": SiteCase(LIST, "site.json is unreadable",
                                  _write("site.json", "{not json")),
    "site-json-wrong-format": SiteCase(LIST, "site.json is not a fedsyft-site/1 file",
                                       _write("site.json", '{"format": "other/9"}')),
    "site-json-a-list": SiteCase(LIST, "site.json is not a fedsyft-site/1 file",
                                 _write("site.json", "[1, 2]")),
    "officer-json-corrupt": SiteCase(AUDIT_REQ, "officer.json",
                                     _write("officer.json", "{broken")),
    "officer-json-missing": SiteCase(AUDIT_REQ, "has no compliance officer",
                                     _delete("officer.json")),
    "log-edited-owner": SiteCase(LIST, "audit log is corrupt, refusing to open the site",
                                 _edit_entry),
    "log-edited-officer": SiteCase(AUDIT_REQ, "is BROKEN at entry", _edit_entry, code=1),
    "log-truncated-owner": SiteCase(LIST, "audit log is corrupt", _truncate_log),
    "log-truncated-officer": SiteCase(AUDIT_REQ, "torn write at the end of the log",
                                      _truncate_log, code=1),
    "head-deleted-owner": SiteCase(LIST, "audit log is corrupt", _delete("audit.head.json")),
    "head-deleted-officer": SiteCase(AUDIT_REQ, "is BROKEN", _delete("audit.head.json"),
                                     code=1),
    "log-deleted-verify": SiteCase(VERIFY, "audit.jsonl does not exist", _delete("audit.jsonl"),
                                   code=1),
    "no-audit-log-verify": SiteCase(VERIFY, "holds no fedsyft audit log", _empty),
    "public-key-not-a-key": SiteCase([*VERIFY, "--public-key", "{tmp}/file.txt"],
                                     "not a valid Ed25519 public key"),
    "public-key-missing": SiteCase([*VERIFY, "--public-key", "{tmp}/none.pem"],
                                   "cannot read public key file"),
    "officer-public-key-not-a-key": SiteCase([*AUDIT_REQ, "--public-key", "{tmp}/file.txt"],
                                             "not a valid Ed25519 public key"),
    "receipts-garbage": SiteCase([*VERIFY, "--receipts", "{tmp}/file.txt"],
                                 "file.txt line 1 is not valid JSON"),
    "wrong-owner-password": SiteCase(LIST, "wrong email or password",
                                     env={"FEDSYFT_OWNER_PASSWORD": "not-the-owner-pass-1"},
                                     unchanged=False),
    "wrong-officer-password": SiteCase(AUDIT_REQ, "wrong email or password",
                                       env={"FEDSYFT_OFFICER_PASSWORD": "not-the-officer-2"},
                                       unchanged=False),
    "no-owner-password": SiteCase(LIST, "no password for data owner",
                                  env={"FEDSYFT_OWNER_PASSWORD": None}),
    "unknown-request": SiteCase(["requests", "show", "ffff0000", "--site", "{site}"],
                                "no request 'ffff0000'", unchanged=False),
    "deny-without-reason": SiteCase(["requests", "deny", "ffff0000", "--site", "{site}"],
                                    "missing option --reason"),
    "list-without-site": SiteCase(["requests", "list"], "missing option --site"),
    "since-after-until": SiteCase([*AUDIT_REQ, "--since", "2025-02-01T00:00:00+00:00",
                                   "--until", "2025-01-01T00:00:00+00:00"],
                                  "--since 2025-02-01T00:00:00+00:00 is not before --until"),
    "since-not-a-time": SiteCase([*AUDIT_REQ, "--since", "yesterday"],
                                 "--since 'yesterday' is not an ISO-8601 time"),
    "until-no-timezone": SiteCase([*AUDIT_REQ, "--until", "2025-01-01T00:00:00"],
                                  "--until 2025-01-01T00:00:00 has no timezone"),
    "export-bad-format": SiteCase(["audit", "export", "--site", "{site}", "--format", "xml",
                                   "--out", "{tmp}/a.xml"], "unknown format 'xml'"),
    "export-out-missing-dir": SiteCase([*EXPORT, "--out", "{tmp}/no/such/a.json"],
                                       "does not exist"),
    "export-out-a-directory": SiteCase([*EXPORT, "--out", "{tmp}"], "is a directory"),
    "export-out-under-a-file": SiteCase([*EXPORT, "--out", "{tmp}/file.txt/a.json"],
                                        "is not a directory"),
}


@pytest.mark.parametrize("case", sorted(SITES))
def test_damaged_site_or_bad_owner_input_is_one_line(case, clinic, tmp_path):
    spec = SITES[case]
    site = tmp_path / "site"
    shutil.copytree(clinic.dir, site, ignore=shutil.ignore_patterns("site.lock"))
    (tmp_path / "file.txt").write_text("not a key, not a receipt\n")
    if spec.damage is not None:
        spec.damage(site)
    before = _digests(site)
    args = [a.replace("{site}", str(site)).replace("{tmp}", str(tmp_path)) for a in spec.args]
    result = _cli(args, env=spec.env, input="")
    _assert_one_line(result.exit_code, result.stdout, result.stderr, spec.code, spec.needle,
                     clinic.secrets)
    if spec.unchanged:
        assert _digests(site) == before, "the command changed the site directory"


# ---- the same, as a user runs it: a real subprocess ------------------------------------------
PROCESS = {
    "sites-1": (["demo", "--sites", "1"], "--sites: 1 is out of range (allowed: 2 to 20)"),
    "epsilon-nan": (["demo", "--epsilon", "nan"], "--epsilon: nan is not a finite number"),
    "iforest-secagg": (["demo", "--model", "iforest", "--aggregation", "secagg"],
                       "--model 'iforest' pools each site's trees"),
    "lstm-ae-without-time": (["demo", "--model", "lstm-ae"], "name the table's time column"),
    "root-unknown-flag": (["--bogus"], "no such option --bogus"),
    "since-after-until": (["audit", "requests", "--site", "x", "--since", "2025-02-01T00:00Z",
                           "--until", "2025-01-01T00:00Z"], "is not before --until"),
}


@pytest.mark.parametrize("case", sorted(PROCESS))
def test_bad_input_in_a_real_process(case):
    args, needle = PROCESS[case]
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120)
    _assert_one_line(proc.returncode, proc.stdout, proc.stderr, 2, needle)


def test_submit_refuses_a_round_option_the_job_cannot_take_in_one_line(tmp_path):
    """``fedsyft submit`` takes the demo's round options and checks them before it connects
    to any site: a strategy that needs individual updates in a secure mode, buffered or
    partial rounds outside plain mode, a buffer larger than the federation."""
    rng = np.random.default_rng(0)
    pd.DataFrame({"f1": rng.normal(size=300), "f2": rng.normal(size=300),
                  "anomaly": (np.arange(300) % 10 == 0).astype(int)}).to_csv(
        tmp_path / "t.csv", index=False)
    assert _cli(["init", tmp_path / "fed", "--data", tmp_path / "t.csv"]).exit_code == 0
    config = tmp_path / "fed" / "federation.toml"
    cases = {
        ("--strategy", "krum", "--aggregation", "paillier"):
            "--strategy 'krum' needs every site's update in clear",
        ("--async", "2", "--epsilon", "3"): "--async is not available with differential",
        ("--async", "9"): "--async 9: a round's buffer takes 1 to --sites",
        ("--fraction", "0.5", "--aggregation", "secagg"): "--fraction < 1 needs --aggregation",
        ("--personalize", "2", "--model", "pca"): "personalization fine-tunes a --model",
    }
    for args, needle in cases.items():
        result = _cli(["submit", "--config", config, *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], \
            (args, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
