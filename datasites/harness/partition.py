"""Splitting one public table across simulated institutions, non-IID (or one series into
consecutive segments), for demos and tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datasites.runtime.tables import TableError
from fed_tasks.spec import JobSpec

# Each site keeps a train split and a stratified test split with both classes: with fewer
# rows per site the split fails later with a vaguer message, or a site trains on nothing.
MIN_ROWS_PER_SITE = 10
#: a site's series needs two windows of the job's series model
SERIES_MIN_ROWS = 2 * JobSpec.model_fields["window"].default


def dirichlet_split(frame: pd.DataFrame, n_sites: int, by: str, alpha: float = 0.5,
                    bins: int = 10, seed: int = 0, min_rows: int = 20) -> list[pd.DataFrame]:
    """Give each site a different share of each quantile bin of feature ``by``.

    For every bin, the proportions going to each site are drawn from Dirichlet(alpha):
    small alpha means each site sees mostly a few operating modes, as institutions do.
    Draws are repeated (seeded) until every site holds at least ``min_rows`` rows.
    """
    if n_sites < 1:
        raise TableError("need at least one site")
    if len(frame) < n_sites * MIN_ROWS_PER_SITE:
        raise TableError(f"table has {len(frame)} rows, fewer than the {n_sites} sites need "
                         f"({MIN_ROWS_PER_SITE} per site, {n_sites * MIN_ROWS_PER_SITE} in all)")
    if by not in frame.columns:
        raise TableError(f"split column {by!r} not in table")
    min_rows = min(min_rows, len(frame) // n_sites)
    codes = pd.qcut(frame[by].rank(method="first"), q=min(bins, len(frame)), labels=False)
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        owner = np.empty(len(frame), dtype=int)
        for b in np.unique(codes):
            idx = np.flatnonzero(codes.to_numpy() == b)
            owner[idx] = rng.choice(n_sites, size=idx.size, p=rng.dirichlet([alpha] * n_sites))
        counts = np.bincount(owner, minlength=n_sites)
        if counts.min() >= min_rows:
            return [frame.iloc[np.flatnonzero(owner == s)].reset_index(drop=True)
                    for s in range(n_sites)]
    raise TableError(f"could not split {len(frame)} rows into {n_sites} sites of at least "
                     f"{min_rows} rows; use fewer sites or a larger alpha")


def contiguous_split(frame: pd.DataFrame, n_sites: int, min_rows: int) -> list[pd.DataFrame]:
    """One series (rows in time order) cut into ``n_sites`` consecutive segments of nearly
    equal length: each device of a fleet holds its own stretch of time. No shuffle: a
    series model reads each segment in order. Each segment needs ``min_rows`` rows (a
    series model's two windows)."""
    if n_sites < 1:
        raise TableError("need at least one site")
    if len(frame) < n_sites * min_rows:
        raise TableError(f"series has {len(frame)} rows, fewer than the {n_sites} sites need "
                         f"({min_rows} consecutive rows per site, two windows; "
                         f"{n_sites * min_rows} in all): use fewer sites")
    bounds = np.linspace(0, len(frame), n_sites + 1).round().astype(int)
    return [frame.iloc[a:b].reset_index(drop=True)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def train_test_split(frame: pd.DataFrame, test_fraction: float = 0.3, seed: int = 0,
                     label: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded hold-out split, stratified by label when there is one."""
    rng = np.random.default_rng(seed)
    groups = [frame.index.to_numpy()] if label is None else [
        frame.index[frame[label] == v].to_numpy() for v in sorted(frame[label].unique())]
    test_idx: list[int] = []
    for idx in groups:
        k = int(round(len(idx) * test_fraction))
        test_idx.extend(rng.permutation(idx)[:k].tolist())
    is_test = frame.index.isin(test_idx)
    return frame.loc[~is_test].reset_index(drop=True), frame.loc[is_test].reset_index(drop=True)
