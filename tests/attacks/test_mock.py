"""Attack: learn about the private table from its published mock (issue 10, section 3 "Mock").

The old mock was drawn from seed 0 (anyone could regenerate it), kept ``min(rows, private
count)`` rows (the count showed through) and dropped mock rows equal to a real row (which
told which tuples exist). The mock must be a function of public column moments and secret
randomness only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datasites.runtime.tables import MOCK_ROWS, FederationSchema, infer_schema, make_mock, validate


def _rounded_moments(frame: pd.DataFrame, schema: FederationSchema) -> list[tuple[str, str]]:
    return [(f"{frame[c].mean():.2g}", f"{frame[c].std(ddof=0):.2g}") for c in schema.features]


def test_two_mocks_of_one_table_differ(shuttle_small, schema):
    """Secret randomness: a second draw (and so anyone re-running the code) gets other rows."""
    a, b = make_mock(shuttle_small, schema), make_mock(shuttle_small, schema)
    assert not a.equals(b)
    assert not a.loc[:, list(schema.features)].to_numpy().tolist() == b.loc[
        :, list(schema.features)].to_numpy().tolist()
    assert not make_mock(shuttle_small, schema).equals(make_mock(shuttle_small, schema, seed=0))


@pytest.mark.parametrize("private_rows", [2, 37, MOCK_ROWS - 1, MOCK_ROWS, MOCK_ROWS + 1, 2400])
def test_mock_row_count_is_public_and_never_the_private_count(shuttle_small, schema,
                                                              private_rows):
    """A fixed public size whatever the private size (a small table still gets MOCK_ROWS
    synthetic rows), and never equal to the private count."""
    frame = shuttle_small.head(private_rows)
    mock = make_mock(frame, schema)
    assert len(mock) != private_rows
    assert len(mock) == (MOCK_ROWS + 1 if private_rows == MOCK_ROWS else MOCK_ROWS)
    assert list(mock.columns) == list(frame.columns)
    assert (mock.dtypes == frame.dtypes).all()
    validate(mock, schema)
    explicit = make_mock(frame, schema, rows=private_rows)  # a caller asking for the count
    assert len(explicit) == private_rows + 1


def test_mock_uses_no_row_level_information(shuttle_small, schema):
    """Two private tables with the same rounded column moments but different rows (and a
    different row count) give the *same* mock for the same draw: the mock generation reads
    nothing of the table beyond the rounded means/stds and the dtypes."""
    rng = np.random.default_rng(7)
    base = shuttle_small.head(300).reset_index(drop=True)
    # every column shuffled on its own, three times over: same moments, other tuples
    other = pd.concat([base.apply(lambda col: rng.permutation(col.to_numpy())) for _ in range(3)],
                      ignore_index=True).astype(base.dtypes.to_dict())
    assert _rounded_moments(base, schema) == _rounded_moments(other, schema)
    base_rows = set(map(tuple, base.to_numpy().tolist()))
    assert sum(tuple(r) in base_rows for r in other.to_numpy().tolist()) < len(other) / 2
    assert len(base) != len(other)
    # the test-only seed fixes the draw, so any difference could only come from the rows
    assert make_mock(base, schema, seed=11).equals(make_mock(other, schema, seed=11))


def test_no_rejection_step_even_when_collisions_are_likely():
    """Integer columns with few values: most mock rows equal some real row by chance. The old
    code dropped those (so the mock's size told how many drawn tuples exist); now the mock
    keeps exactly ``rows`` rows, and its collisions with the private table are as frequent
    as with an unrelated table of the same moments (they carry no information)."""
    rng = np.random.default_rng(3)
    n = 400
    private = pd.DataFrame({"a": rng.integers(0, 2, n), "b": rng.integers(0, 2, n),
                            "y": (rng.random(n) < 0.2).astype(np.int64)})
    # unrelated table with the same rounded moments but a different set of rows
    unrelated = private.copy()
    unrelated["b"] = rng.permutation(unrelated["b"].to_numpy())
    schema = infer_schema(private, "y")
    mock = make_mock(private, schema, rows=300)
    assert len(mock) == 300

    def collision_rate(table: pd.DataFrame) -> float:
        real = set(map(tuple, table.loc[:, ["a", "b"]].to_numpy().tolist()))
        return float(np.mean([tuple(r) in real
                              for r in mock.loc[:, ["a", "b"]].to_numpy().tolist()]))

    assert collision_rate(private) > 0.3  # many collisions: none were rejected
    assert collision_rate(private) == pytest.approx(collision_rate(unrelated), abs=0.1)
