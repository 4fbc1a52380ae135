"""Bad tables fail early with errors naming the problem."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from datasites.harness.partition import dirichlet_split, train_test_split
from datasites.runtime.tables import TableError, infer_schema, make_mock, read_table, validate


def _csv(tmp_path, frame: pd.DataFrame, name: str = "t.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_bundled_table_is_the_documented_shuttle(shuttle):
    assert shuttle.shape == (49_097, 10)
    assert int(shuttle["anomaly"].sum()) == 3_511


def test_missing_file(tmp_path):
    with pytest.raises(TableError, match="not found"):
        read_table(tmp_path / "nope.csv")


def test_empty_file(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(TableError, match="empty"):
        read_table(tmp_path / "e.csv")


def test_header_only_file_has_no_rows(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,label\n")
    with pytest.raises(TableError, match="no rows"):
        read_table(tmp_path / "h.csv")


def test_binary_garbage_is_not_a_csv(tmp_path):
    path = tmp_path / "g.csv"
    path.write_bytes(gzip.compress(b"x") + b"\xff\xfe\x00garbage")
    with pytest.raises(TableError):
        read_table(path)


def test_missing_label_column(shuttle_small):
    with pytest.raises(TableError, match="label column 'target' not in table"):
        infer_schema(shuttle_small, "target")


def test_non_numeric_column_named(shuttle_small):
    bad = shuttle_small.head(50).assign(f3="x")
    with pytest.raises(TableError, match=r"\['f3'\] are not numeric"):
        infer_schema(bad, "anomaly")


def test_constant_column_named(shuttle_small):
    bad = shuttle_small.head(50).assign(f4=7)
    with pytest.raises(TableError, match=r"\['f4'\] are constant"):
        infer_schema(bad, "anomaly")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_named_with_position(shuttle_small, value):
    bad = shuttle_small.head(50).astype({"f5": float})
    bad.loc[7, "f5"] = value
    with pytest.raises(TableError, match=r"column 'f5' at row 7"):
        infer_schema(bad, "anomaly")


def test_label_must_be_binary(shuttle_small):
    bad = shuttle_small.head(50).copy()
    bad.loc[3, "anomaly"] = 2
    with pytest.raises(TableError, match="must hold only 0 and 1"):
        infer_schema(bad, "anomaly")


def test_site_schema_mismatch_is_named(shuttle_small, schema):
    other = shuttle_small.head(40).rename(columns={"f9": "g9"})
    with pytest.raises(TableError, match=r"missing columns \['f9'\], unexpected columns \['g9'\]"):
        validate(other, schema, where="site 'x'")


def test_fewer_rows_than_sites(shuttle_small):
    with pytest.raises(TableError, match="fewer than the 5 sites"):
        dirichlet_split(shuttle_small.head(3), 5, by="f1")


def test_csv_round_trip_through_read_table(tmp_path, shuttle_small):
    back = read_table(_csv(tmp_path, shuttle_small.head(100)))
    assert infer_schema(back, "anomaly").features == tuple(f"f{i}" for i in range(1, 10))


def test_mock_has_schema_and_no_real_row(shuttle_small, schema):
    mock = make_mock(shuttle_small, schema, rows=300, seed=1)
    assert list(mock.columns) == list(shuttle_small.columns)
    assert (mock.dtypes == shuttle_small.dtypes).all()
    validate(mock, schema)
    # no rejection step any more (tests/attacks/test_mock.py): on shuttle's wide integer
    # columns a chance match of all 9 features has negligible probability
    real = set(map(tuple, shuttle_small.drop(columns="anomaly").to_numpy().tolist()))
    assert not any(tuple(r) in real for r in mock.drop(columns="anomaly").to_numpy().tolist())


def test_dirichlet_split_is_seeded_complete_and_non_iid(shuttle_small):
    a = dirichlet_split(shuttle_small, 3, by="f1", alpha=0.3, seed=4)
    b = dirichlet_split(shuttle_small, 3, by="f1", alpha=0.3, seed=4)
    assert all(x.equals(y) for x, y in zip(a, b, strict=True))
    assert sum(map(len, a)) == len(shuttle_small)
    medians = [p["f1"].median() for p in a]
    assert max(medians) - min(medians) > 1.0  # sites see different operating modes


def test_train_test_split_is_stratified(shuttle_small):
    train, test = train_test_split(shuttle_small, 0.3, seed=0, label="anomaly")
    assert len(train) + len(test) == len(shuttle_small)
    assert abs(test["anomaly"].mean() - shuttle_small["anomaly"].mean()) < 0.01
