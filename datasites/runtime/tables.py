"""Loading a site's private table, checking it against the federation schema, and mocks.

Every check fails with :class:`TableError` naming the file, site, column or value at fault,
before anything is uploaded, so a bad table never leaves a half-provisioned site behind.
"""

from __future__ import annotations

import secrets
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MOCK_ROWS = 500  # a mock's row count: a public constant, not derived from the private table
# a mock's time column is 0, 60, 120, ... seconds: public constants, never the private times
MOCK_TIME_STEP = 60
# numbers in a time column are seconds since 1970-01-01 UTC; beyond this (about the year
# 2262) pandas' timestamps overflow, so such a number is not a time
MAX_TIME_SECONDS = 9_200_000_000
# A table wider than this is refused up front: the model and the column statistics grow
# with the width, and a very wide table stalled for minutes before failing.
MAX_COLUMNS = 10_000
# Standardisation squares every value: above this magnitude the sum of squares overflows
# float64 (1e308) and the model trains on inf/NaN.
MAX_ABS_VALUE = 1e150


class TableError(ValueError):
    """A table cannot be used: missing, malformed, or not matching the federation schema."""


@dataclass(frozen=True)
class FederationSchema:
    """Columns every site must hold: numeric features, plus an optional 0/1 label and an
    optional time column (integer seconds; a series' order, never a feature).

    The label is used only by site-side evaluation and never leaves a site.
    """

    features: tuple[str, ...]
    label: str | None = None
    time: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (((self.time,) if self.time else ()) + self.features
                + ((self.label,) if self.label else ()))

    def describe(self) -> str:
        label = f"; label column {self.label!r} (0 = normal, 1 = anomaly)" if self.label else ""
        time = (f"; time column {self.time!r} (orders the rows, never a feature)"
                if self.time else "")
        return f"{len(self.features)} numeric features {list(self.features)}{label}{time}"


def read_table(path: str | Path, time_column: str | None = None) -> pd.DataFrame:
    """Read a CSV (optionally gzip-compressed) with a header row.

    With ``time_column`` the table is a series: that column is parsed as dates/times
    (numbers: seconds since 1970-01-01 UTC; text with a zone: converted to UTC, without
    one: taken as UTC), stored as int64 seconds, and the rows are sorted by it; a value that
    is no time, or a time held by two rows, is refused naming its row.
    """
    path = Path(path)
    if path.is_dir():
        raise TableError(f"table {path} is a directory, not a CSV file")
    if not path.is_file():
        raise TableError(f"table file not found: {path}")
    try:
        _check_header(path, pd.read_csv(path, header=None, nrows=1, dtype=str,
                                        keep_default_na=False).iloc[0].tolist())
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError as exc:
        raise TableError(f"table {path} is empty") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise TableError(f"table {path} is not a readable CSV: {exc}") from exc
    except (EOFError, zlib.error) as exc:  # a truncated or corrupt .gz
        raise TableError(f"table {path} is not a readable compressed CSV ({exc})") from exc
    if frame.empty:
        raise TableError(f"table {path} has no rows")
    return frame if time_column is None else _in_time_order(frame, time_column, path)


def _in_time_order(frame: pd.DataFrame, column: str, path: Path) -> pd.DataFrame:
    """``frame`` with ``column`` as int64 seconds, sorted by it (see :func:`read_table`)."""
    if column not in frame.columns:
        raise TableError(f"time column {column!r} not in table {path}; columns are "
                         f"{[str(c) for c in frame.columns]}")
    raw = frame[column]
    where = f"table {path}: time column {column!r}"
    if pd.api.types.is_bool_dtype(raw):
        raise TableError(f"{where} holds true/false values, not times")
    if pd.api.types.is_numeric_dtype(raw):  # seconds since the epoch
        x = raw.to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(x) & (np.abs(x) <= MAX_TIME_SECONDS))
        seconds = np.floor(np.where(bad, 0.0, x)).astype(np.int64)
    else:
        parsed = _parse_times(raw)
        bad = parsed.isna().to_numpy()
        seconds = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
                   ).fillna(0).to_numpy(dtype=np.int64)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        more = f"; {int(bad.sum())} values are not" if bad.sum() > 1 else ""
        raise TableError(f"{where}: {raw.iloc[row]!r} at row {row} is not a date/time{more}")
    repeated = pd.Series(seconds).duplicated(keep=False).to_numpy()
    if repeated.any():
        first = int(np.flatnonzero(repeated)[0])
        rows = np.flatnonzero(seconds == seconds[first])[:2].tolist()
        raise TableError(f"{where}: rows {rows[0]} and {rows[1]} hold the same time "
                         f"{raw.iloc[first]!r} (to the second); each row of a series needs "
                         "its own time")
    out = frame.assign(**{column: seconds})
    return out.sort_values(column, kind="stable").reset_index(drop=True)


def _parse_times(raw: pd.Series) -> pd.Series:
    """Text as UTC timestamps (NaT where a value is no time): pandas infers one format from
    the first value; only if that leaves values unparsed is each value parsed by itself."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "could not infer format"
        try:
            parsed = pd.to_datetime(raw, errors="coerce", utc=True)
            if parsed.isna().any():
                parsed = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
        except (ValueError, TypeError, OverflowError):
            parsed = pd.Series([_one_time(v) for v in raw], index=raw.index,
                               dtype="datetime64[ns, UTC]")
    return parsed


def _one_time(value: object) -> pd.Timestamp:
    try:
        return pd.to_datetime(value, utc=True)
    except (ValueError, TypeError, OverflowError):
        return pd.NaT


def _check_header(path: Path, header: list[str]) -> None:
    """Refuse duplicate and too many column names, from the raw header: pandas would
    silently rename a second ``x`` to ``x.1`` and then train on both."""
    if len(header) > MAX_COLUMNS:
        raise TableError(f"table {path} has {len(header):,} columns, more than the limit of "
                         f"{MAX_COLUMNS:,}; select the feature columns first")
    duplicates = sorted(name for name, n in Counter(header).items() if n > 1)
    if duplicates:
        raise TableError(f"table {path} has duplicate column names {duplicates}: give each "
                         "column its own name")


@dataclass(frozen=True)
class SchemaResult:
    """The federation's schema and the columns left out of it, for the warning and report."""

    schema: FederationSchema
    dropped_constant: tuple[str, ...] = ()  # the same value in every row of every input file
    dropped_by_user: tuple[str, ...] = ()  # --drop-columns

    def select(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with exactly the schema's columns, in the schema's order."""
        return frame.loc[:, list(self.schema.columns)]

    def warning(self) -> str | None:
        """One line naming the constant columns dropped (None if there were none)."""
        if not self.dropped_constant:
            return None
        return (f"warning: dropped feature columns {list(self.dropped_constant)}: each holds "
                "one value in every row of the input, so it carries no information")

    def report(self) -> dict[str, list[str]]:
        return {"constant": list(self.dropped_constant), "user": list(self.dropped_by_user)}


def inspect_tables(frames: pd.DataFrame | list[pd.DataFrame], label: str | None,
                   drop: tuple[str, ...] | list[str] = (),
                   names: list[str] | None = None, time: str | None = None) -> SchemaResult:
    """The federation schema of one or more input tables (one per institution).

    Every column but the label, the time column and ``drop`` is a feature. All tables must
    hold the same columns (the first one's order is kept); features must be numeric; a
    feature holding one value over *all* tables together is dropped (constant at one
    institution only is kept: the federation's variance is not zero). Constancy is decided
    here, on the whole input, never by a site, which sees only its own rows. ``names`` name
    the tables in errors. ``time`` (a series' time column, as :func:`read_table` parsed it)
    is kept in the schema but is never a feature, so neither check applies to it.
    """
    frames = [frames] if isinstance(frames, pd.DataFrame) else list(frames)
    if not frames:
        raise TableError("no input table")
    names = list(names) if names is not None else (
        ["input table"] if len(frames) == 1 else [f"table {i + 1}" for i in range(len(frames))])
    first = [str(c) for c in frames[0].columns]
    for name, frame in zip(names, frames, strict=True):
        if label is not None and label not in frame.columns:
            where = "table" if len(frames) == 1 else name
            raise TableError(f"label column {label!r} not in {where}; columns are "
                             f"{list(frame.columns)}")
    for name, frame in zip(names[1:], frames[1:], strict=True):
        cols = [str(c) for c in frame.columns]
        missing = [c for c in first if c not in cols]
        extra = [c for c in cols if c not in first]
        if missing or extra:
            raise TableError(f"{name} does not have the columns of {names[0]}: missing columns "
                             f"{missing}, unexpected columns {extra}")
    drop = tuple(str(c) for c in drop)
    unknown = [c for c in drop if c not in first]
    if unknown:
        raise TableError(f"--drop-columns {unknown} are not columns of the table; columns "
                         f"are {first}")
    if label is not None and label in drop:
        raise TableError(f"--drop-columns names the label column {label!r}; use "
                         "--label-column for the label")
    if time is not None:
        check_time_role(time, label, drop)
        if time not in first:
            raise TableError(f"time column {time!r} not in the table; columns are {first}")
    features = tuple(c for c in first if c not in (label, time) and c not in drop)
    if not features:
        raise TableError("table has no feature columns besides the label"
                         + (" and the dropped columns" if drop else ""))
    for name, frame in zip(names, frames, strict=True):
        text = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])
                or pd.api.types.is_bool_dtype(frame[c])]
        if text:
            where = "" if len(frames) == 1 else f"{name}: "
            raise TableError(f"{where}feature columns {text} are not numeric (categorical, "
                             f"text or boolean); drop them with --drop-columns {','.join(text)}")
    schema = FederationSchema(features, label, time)
    for name, frame in zip(names, frames, strict=True):
        validate(frame.loc[:, list(schema.columns)], schema, where=name)
    low = np.min([f.loc[:, list(features)].to_numpy(np.float64).min(axis=0) for f in frames],
                 axis=0)
    high = np.max([f.loc[:, list(features)].to_numpy(np.float64).max(axis=0) for f in frames],
                  axis=0)
    constant = tuple(c for c, lo, hi in zip(features, low, high, strict=True) if lo == hi)
    kept = tuple(c for c in features if c not in constant)
    if not kept:
        raise TableError(f"every feature column is constant over the whole input {list(constant)}"
                         ": nothing to learn from")
    if label is not None:
        classes = set().union(*(set(pd.unique(f[label])) for f in frames))
        if len(classes) < 2:
            raise TableError(f"label column {label!r} holds only {classes.pop()} (one class): "
                             "evaluation needs both normal (0) and anomalous (1) rows")
    user = tuple(c for c in first if c in drop)
    return SchemaResult(FederationSchema(kept, label, time), constant, user)


def check_time_role(time: str | None, label: str | None, drop: tuple[str, ...] = ()) -> None:
    """Refuse a time column that is also the label or dropped (before any table is read)."""
    if time is not None and (time == label or time in drop):
        what = "the label column" if time == label else "a dropped column (--drop-columns)"
        raise TableError(f"--time-column {time!r} is also {what}; a time column only orders "
                         "the rows")


def infer_schema(frame: pd.DataFrame, label: str | None,
                 drop: tuple[str, ...] | list[str] = ()) -> FederationSchema:
    """The schema of one table (see :func:`inspect_tables`, which also names the columns
    it left out): every column but the label, ``drop`` and constant columns is a feature."""
    return inspect_tables(frame, label, drop).schema


def validate(frame: pd.DataFrame, schema: FederationSchema, where: str = "table",
             min_rows: int = 1) -> None:
    """Raise :class:`TableError` unless ``frame`` has exactly the schema's columns, finite
    numeric features, a 0/1 label, distinct integer seconds in the time column and at least
    ``min_rows`` rows."""
    if len(frame) < min_rows:
        raise TableError(f"{where} has {len(frame)} rows, needs at least {min_rows}")
    missing = [c for c in schema.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in schema.columns]
    if missing or extra:
        raise TableError(f"{where} does not match the federation schema: "
                         f"missing columns {missing}, unexpected columns {extra}")
    non_numeric = [c for c in schema.features if not pd.api.types.is_numeric_dtype(frame[c])
                   or pd.api.types.is_bool_dtype(frame[c])]
    if non_numeric:
        raise TableError(f"{where}: feature columns {non_numeric} are not numeric")
    values = frame.loc[:, list(schema.features)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise TableError(f"{where}: {int(bad.sum())} NaN or infinite values, first in column "
                         f"{schema.features[col]!r} at row {row}")
    huge = np.abs(values).max(axis=0) > MAX_ABS_VALUE
    if huge.any():
        names = [schema.features[i] for i in np.flatnonzero(huge)]
        raise TableError(f"{where}: feature columns {names} hold values above "
                         f"{MAX_ABS_VALUE:g} in magnitude, whose squares overflow the "
                         "standardisation; rescale them")
    if schema.label:
        labels = frame[schema.label]
        if labels.isna().any() or not set(pd.unique(labels)).issubset({0, 1}):
            seen = sorted(map(str, pd.unique(labels)))[:5]
            raise TableError(f"{where}: label column {schema.label!r} must hold only 0 and 1, "
                             f"found {seen}")
    if schema.time:
        times = frame[schema.time]
        if not pd.api.types.is_integer_dtype(times):
            raise TableError(f"{where}: time column {schema.time!r} must hold integer seconds "
                             "(read the table with its time column)")
        if times.duplicated().any():
            raise TableError(f"{where}: time column {schema.time!r} holds "
                             f"{times[times.duplicated()].iloc[0]} more than once")


def make_mock(frame: pd.DataFrame, schema: FederationSchema, rows: int = MOCK_ROWS, *,
              seed: int | None = None) -> pd.DataFrame:
    """A synthetic table with the same schema and dtypes, drawn from public column moments.

    Each feature is drawn independently from a normal with the column's mean and standard
    deviation rounded to 2 significant figures (integer columns: rounded to integers and
    clipped to the dtype's range); the label is 1 with a fixed probability of 0.1; a time
    column is ``0, MOCK_TIME_STEP, 2 * MOCK_TIME_STEP, ...`` seconds, public constants that
    depend on nothing private (not even the first time or the step). Nothing else of the
    private table is used, so the mock reveals no row, no joint structure and no row count:

    - randomness comes from :mod:`secrets` (a predictable seed would let anyone regenerate
      the draws); ``seed`` exists for tests only;
    - it has ``rows`` rows, a public number, whatever the private size (a small table still
      gets ``rows`` synthetic rows), except that it is never *equal* to the private count:
      ``rows + 1`` if it would be. (That exception tells that a mock of ``rows + 1`` rows
      comes from a table of exactly ``rows`` rows; nothing about any other size.)
    - there is no rejection step: dropping mock rows that equal a real row would tell which
      tuples exist. For float columns a draw equal to a real value has probability ~zero. For
      integer columns a mock row may equal a real row by chance; that reveals nothing, since
      it was drawn independently of the rows, from the rounded moments alone.
    """
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    rows = int(rows)
    if rows < 1:
        raise ValueError(f"a mock needs at least 1 row, got rows={rows}")
    if rows == len(frame):
        rows += 1
    out: dict[str, np.ndarray] = {}
    for col in schema.features:
        real = frame[col].to_numpy(dtype=np.float64)
        mean, std = _round_sig(real.mean()), _round_sig(real.std() or 1.0)
        draw = rng.normal(mean, std, rows)
        dtype = frame[col].dtype
        if pd.api.types.is_integer_dtype(dtype):
            info = np.iinfo(dtype)
            out[col] = np.clip(np.round(draw), info.min, info.max).astype(dtype)
        else:
            out[col] = draw.astype(dtype)
    if schema.label:
        out[schema.label] = (rng.random(rows) < 0.1).astype(frame[schema.label].dtype)
    if schema.time:
        out[schema.time] = np.arange(rows, dtype=np.int64) * MOCK_TIME_STEP
    return pd.DataFrame(out, columns=list(schema.columns))


def _round_sig(x: float, digits: int = 2) -> float:
    if x == 0 or not np.isfinite(x):
        return 0.0
    return float(round(x, -int(np.floor(np.log10(abs(x)))) + digits - 1))
