"""Bad tables fail early with errors naming the problem."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasites.harness.partition import dirichlet_split, train_test_split
from datasites.runtime.tables import (
    TableError,
    infer_schema,
    inspect_tables,
    make_mock,
    read_table,
    validate,
)


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


def test_constant_column_dropped_and_named(shuttle_small):
    bad = shuttle_small.head(50).assign(f4=7)
    found = inspect_tables(bad, "anomaly")
    assert found.dropped_constant == ("f4",) and found.dropped_by_user == ()
    assert "f4" not in found.schema.features and len(found.schema.features) == 8
    assert "['f4']" in found.warning() and found.warning().count("\n") == 0
    assert found.report() == {"constant": ["f4"], "user": []}
    assert list(found.select(bad).columns) == list(found.schema.columns)
    assert infer_schema(bad, "anomaly") == found.schema
    assert inspect_tables(shuttle_small.head(50), "anomaly").warning() is None


def test_constancy_is_over_all_tables_together(shuttle_small):
    """Constant at one institution but not in the federation: kept; constant everywhere
    (the same value in every table): dropped."""
    a, b = shuttle_small.head(60).assign(f4=7), shuttle_small.iloc[60:120].reset_index(drop=True)
    assert inspect_tables([a, b], "anomaly").dropped_constant == ()
    both = inspect_tables([a, b.assign(f4=7, f6=1.5)], "anomaly", names=["a.csv", "b.csv"])
    assert both.dropped_constant == ("f4",)  # f6 varies in a
    assert "f4" not in both.schema.features and "f6" in both.schema.features


def test_every_feature_constant_is_refused(shuttle_small):
    bad = shuttle_small.head(50)[["f1", "f2", "anomaly"]].assign(f1=1, f2=2.5)
    with pytest.raises(TableError, match=r"every feature column is constant .*\['f1', 'f2'\]"):
        inspect_tables(bad, "anomaly")


def test_categorical_columns_named_with_the_option_that_drops_them(shuttle_small):
    bad = shuttle_small.head(60).assign(ward=["icu", "er", "gp"] * 20, note="n/a",
                                        flag=[True, False] * 30)
    with pytest.raises(TableError, match=r"\['ward', 'note', 'flag'\] are not numeric "
                                         r"\(categorical, text or boolean\); drop them with "
                                         r"--drop-columns ward,note,flag"):
        inspect_tables(bad, "anomaly")
    found = inspect_tables(bad, "anomaly", drop=("note", "ward", "flag"))
    assert found.dropped_by_user == ("ward", "note", "flag")  # in the table's order
    assert found.schema.features == tuple(f"f{i}" for i in range(1, 10))


def test_drop_columns_must_name_columns_of_the_table(shuttle_small):
    with pytest.raises(TableError, match=r"--drop-columns \['ward'\] are not columns"):
        inspect_tables(shuttle_small.head(50), "anomaly", drop=("f2", "ward"))
    with pytest.raises(TableError, match="names the label column 'anomaly'"):
        inspect_tables(shuttle_small.head(50), "anomaly", drop=("anomaly",))


def test_tables_of_different_columns_name_the_file_and_columns(shuttle_small):
    a = shuttle_small.head(50)
    b = shuttle_small.iloc[50:100].rename(columns={"f9": "g9"}).drop(columns="f8")
    with pytest.raises(TableError, match=r"b.csv does not have the columns of a.csv: missing "
                                         r"columns \['f8', 'f9'\], unexpected columns \['g9'\]"):
        inspect_tables([a, b], "anomaly", names=["a.csv", "b.csv"])
    text = shuttle_small.iloc[50:100].assign(f2="x")
    with pytest.raises(TableError, match=r"^b.csv: feature columns \['f2'\] are not numeric"):
        inspect_tables([a, text], "anomaly", names=["a.csv", "b.csv"])
    shuffled = shuttle_small.iloc[50:100][list(reversed(a.columns))]  # same set, other order
    assert inspect_tables([a, shuffled], "anomaly").schema.features[0] == "f1"


def test_one_site_per_table_in_the_demo(tmp_path, shuttle_small):
    """k tables: k sites, each its own table (no split across sites), each with its own
    stratified test split; constant columns judged over all tables."""
    from datasites.harness.demo import DemoConfig, load_tables

    a = shuttle_small.head(400).assign(c=1, f5=0)
    b = shuttle_small.iloc[400:1000].assign(c=1)
    paths = [_csv(tmp_path, a, "a.csv"), _csv(tmp_path, b, "b.csv")]
    found, splits = load_tables(DemoConfig(data=tuple(paths), sites=2))
    assert found.dropped_constant == ("c",) and "f5" in found.schema.features
    assert [len(tr) + len(te) for tr, te in splits] == [400, 600]
    assert all(list(tr.columns) == list(found.schema.columns) for tr, _ in splits)
    assert sorted(pd.concat([tr for tr, _ in splits] + [te for _, te in splits])["f1"]) == \
        sorted(pd.concat([a, b])["f1"])
    with pytest.raises(TableError, match="--sites 3 does not match the 2 --data files"):
        DemoConfig(data=tuple(paths), sites=3)
    # a site whose test split has one class is evaluated with "-"; the pooled rows need both
    normal = _csv(tmp_path, b[b["anomaly"] == 0], "normal.csv")
    _, splits = load_tables(DemoConfig(data=(paths[0], normal), sites=2))
    assert splits[1][1]["anomaly"].nunique() == 1
    one = _csv(tmp_path, pd.concat([a[a["anomaly"] == 1].head(1), a[a["anomaly"] == 0]]),
               "one.csv")  # 1 anomaly: none in a 30 % test split
    with pytest.raises(TableError, match="test splits together hold only one class"):
        load_tables(DemoConfig(data=(one, normal), sites=2))
    assert DemoConfig(data=paths[0]).data == (paths[0],)  # one path is taken as a 1-tuple


def test_threshold_metrics_are_undefined_not_zero_where_nothing_counts():
    from datasites.harness.demo import pooled_counts, threshold_metrics

    assert threshold_metrics({"tp": 0, "fp": 0, "fn": 5, "tn": 50}) == {
        "precision": None, "recall": 0.0, "f1": 0.0}
    assert threshold_metrics({"tp": 0, "fp": 0, "fn": 0, "tn": 50})["f1"] is None
    pooled = pooled_counts([{"tp": 3, "fp": 1, "fn": 1, "tn": 10},
                            {"tp": 1, "fp": 1, "fn": 3, "tn": 20}])
    assert pooled == {"tp": 4, "fp": 2, "fn": 4, "tn": 30, "precision": 4 / 6, "recall": 0.5,
                      "f1": 8 / 14}
    assert pooled_counts([{"roc_auc": 0.9}]) == {}


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


def test_init_leaves_out_constant_and_dropped_columns(tmp_path, shuttle_small):
    """``fedsyft init --drop-columns``: the site tables hold the schema's columns only."""
    from datasites.deploy.init import write_example

    data = _csv(tmp_path, shuttle_small.head(300).assign(unit=7, ward="icu"), "rows.csv")
    said: list[str] = []
    config = write_example(tmp_path / "fed", data, "anomaly", 2, 0, 8100,
                           drop_columns=("ward",), log=said.append)
    assert config.exists() and len(said) == 1 and "['unit']" in said[0]
    for name in ("site-1", "site-2"):
        table = read_table(tmp_path / "fed" / "data" / f"{name}.csv")
        assert list(table.columns) == [*(f"f{i}" for i in range(1, 10)), "anomaly"]


# ---- series: a time column (real NAB server-CPU series) --------------------------------------
NAB = Path(__file__).parents[1] / "datasites" / "data" / "nab"


def _nab(name: str, start: int, rows: int) -> pd.DataFrame:
    return pd.read_csv(NAB / f"{name}.csv.gz").iloc[start:start + rows].reset_index(drop=True)


def test_time_column_is_parsed_to_seconds_and_sorted(tmp_path):
    real = _nab("ec2_cpu_utilization_fe7f93", 500, 200)
    path = _csv(tmp_path, real.sample(frac=1.0, random_state=3), "shuffled.csv")
    series = read_table(path, time_column="timestamp")
    assert series["timestamp"].dtype == np.int64 and series["timestamp"].is_monotonic_increasing
    first = pd.Timestamp(real["timestamp"].iloc[0], tz="UTC")
    assert series["timestamp"].iloc[0] == int(first.timestamp())
    assert np.all(np.diff(series["timestamp"]) == 300)  # NAB's 5-minute samples
    assert series["value"].tolist() == real["value"].tolist()  # rows back in time order
    # numbers are seconds since 1970; a zone is converted to UTC
    seconds = _csv(tmp_path, series.iloc[::-1], "seconds.csv")
    assert read_table(seconds, time_column="timestamp").equals(series)
    zoned = real.head(3).assign(timestamp=[f"{t}+02:00" for t in real["timestamp"].head(3)])
    back = read_table(_csv(tmp_path, zoned, "zoned.csv"), time_column="timestamp")
    assert (back["timestamp"] == series["timestamp"].head(3) - 7200).all()


def test_bad_times_are_named_with_file_column_and_row(tmp_path):
    real = _nab("ec2_cpu_utilization_fe7f93", 0, 40).astype({"timestamp": object})
    bad = real.copy()
    bad.loc[7, "timestamp"] = "2014-02-31 25:00:00"
    with pytest.raises(TableError, match=r"bad.csv: time column 'timestamp': "
                                         r"'2014-02-31 25:00:00' at row 7 is not a date/time$"):
        read_table(_csv(tmp_path, bad, "bad.csv"), time_column="timestamp")
    twice = real.copy()
    twice.loc[9, "timestamp"] = real.loc[3, "timestamp"]
    with pytest.raises(TableError, match=r"twice.csv: time column 'timestamp': rows 3 and 9 "
                                         f"hold the same time '{real.loc[3, 'timestamp']}'"):
        read_table(_csv(tmp_path, twice, "twice.csv"), time_column="timestamp")
    with pytest.raises(TableError, match=r"time column 'when' not in table .*columns are "
                                         r"\['timestamp', 'value', 'anomaly'\]"):
        read_table(_csv(tmp_path, real, "ok.csv"), time_column="when")


def test_time_column_is_in_the_schema_but_never_a_feature(tmp_path):
    from datasites.runtime.tables import FederationSchema

    series = read_table(_csv(tmp_path, _nab("ec2_cpu_utilization_fe7f93", 500, 200)),
                        time_column="timestamp")
    found = inspect_tables(series.assign(load=series["value"] * 2), "anomaly", time="timestamp")
    assert found.schema == FederationSchema(("value", "load"), "anomaly", "timestamp")
    assert found.schema.columns == ("timestamp", "value", "load", "anomaly")
    assert "time column 'timestamp'" in found.schema.describe()
    assert list(found.select(series.assign(load=1.0)).columns) == list(found.schema.columns)
    for kwargs, needle in (({"time": "anomaly"}, "also the label column"),
                           ({"time": "timestamp", "drop": ("timestamp",)}, "a dropped column")):
        with pytest.raises(TableError, match=needle):
            inspect_tables(series, "anomaly", **kwargs)
    with pytest.raises(TableError, match="time column 'timestamp' must hold integer seconds"):
        validate(series.astype({"timestamp": float}),
                 FederationSchema(("value",), "anomaly", "timestamp"))


def test_mock_time_column_is_public_and_independent_of_the_private_times(tmp_path):
    from datasites.runtime.tables import MOCK_TIME_STEP

    tables = [read_table(_csv(tmp_path, _nab(name, start, 300), f"{name}.csv"),
                         time_column="timestamp")
              for name, start in (("ec2_cpu_utilization_fe7f93", 500),
                                  ("rds_cpu_utilization_e47b3b", 2000))]
    schema = inspect_tables(tables, "anomaly", time="timestamp").schema
    mocks = [make_mock(t, schema, rows=100, seed=i) for i, t in enumerate(tables)]
    public = np.arange(100, dtype=np.int64) * MOCK_TIME_STEP
    for table, mock in zip(tables, mocks, strict=True):
        validate(mock, schema)
        assert mock["timestamp"].tolist() == public.tolist()  # the same at every site
        assert not set(mock["timestamp"]) & set(table["timestamp"])
    assert not mocks[0]["value"].equals(mocks[1]["value"])  # features: drawn per site


def test_contiguous_split_keeps_the_series_order():
    from datasites.harness.partition import contiguous_split

    series = _nab("ec2_cpu_utilization_fe7f93", 0, 650)
    parts = contiguous_split(series, 3, min_rows=64)
    assert [len(p) for p in parts] == [217, 216, 217]
    assert pd.concat(parts, ignore_index=True).equals(series)
    with pytest.raises(TableError, match="series has 650 rows, fewer than the 11 sites need "
                                         r"\(64 consecutive rows per site"):
        contiguous_split(series, 11, min_rows=64)


def test_series_demo_sites_hold_whole_series(tmp_path):
    """One series + --sites N: N consecutive segments; k series: one device each; each site
    trains and is evaluated on its whole series."""
    from datasites.harness.demo import DemoConfig, load_tables

    a = _csv(tmp_path, _nab("ec2_cpu_utilization_fe7f93", 500, 300), "a.csv")
    b = _csv(tmp_path, _nab("rds_cpu_utilization_e47b3b", 700, 200), "b.csv")
    found, splits = load_tables(DemoConfig(data=(a,), sites=2, model="lstm-ae",
                                           time_column="timestamp"))
    assert [len(tr) for tr, _ in splits] == [150, 150] and all(tr is te for tr, te in splits)
    assert splits[0][0]["timestamp"].max() < splits[1][0]["timestamp"].min()
    _, splits = load_tables(DemoConfig(data=(a, b), sites=2, model="lstm-ae",
                                       time_column="timestamp"))
    assert [len(tr) for tr, _ in splits] == [300, 200]
    assert all(tr["timestamp"].is_monotonic_increasing for tr, _ in splits)
    with pytest.raises(TableError, match="leave --time-column out"):
        DemoConfig(data=(a,), model="ae", time_column="timestamp")


def test_pooled_series_metrics_are_the_sites_own_scores_concatenated(tmp_path):
    """Each device's series is scored in its own order and scale: the harness's pooled
    counts equal the sum of the sites' own evaluations, whatever order the rows are in."""
    from datasites.harness.demo import DemoConfig, _pooled, load_tables, pooled_counts
    from fed_tasks.local import LocalSite
    from fed_tasks.orchestrator import FederatedTrainer
    from fed_tasks.spec import JobSpec

    a = _csv(tmp_path, _nab("ec2_cpu_utilization_fe7f93", 600, 300), "a.csv")
    b = _csv(tmp_path, _nab("rds_cpu_utilization_e47b3b", 800, 300), "b.csv")
    found, splits = load_tables(DemoConfig(data=(a, b), sites=2, model="lstm-ae",
                                           time_column="timestamp"))
    s = found.schema
    spec = JobSpec(model="lstm-ae", features=s.features, label_column=s.label,
                   time_column=s.time, rounds=1, target_fpr=0.05, min_local_steps=2)
    sites = [LocalSite(f"s{i}", spec, tr, te.sample(frac=1.0, random_state=i))
             for i, (tr, te) in enumerate(splits)]
    trainer = FederatedTrainer(spec, sites, progress=False)
    result = trainer.fit()
    own = trainer.evaluate(result)
    pooled = _pooled(result, [site.test for site in sites], s)
    assert {k: pooled[k] for k in ("tp", "fp", "fn", "tn")} == {
        k: v for k, v in pooled_counts(own).items() if k in ("tp", "fp", "fn", "tn")}
    assert [_pooled(result, [site.test], s)["roc_auc"] for site in sites] == [
        r["roc_auc"] for r in own]


def test_encoding_bounds_are_checked_from_the_row_counts():
    from datasites.harness.demo import encoding_problems
    from fed_tasks.spec import JobSpec

    pca = JobSpec(model="pca", features=("a", "b"), target_fpr=0.05)
    assert encoding_problems(pca, 10_000) == []
    too_many = encoding_problems(pca, 40_000_000)
    assert any(p.startswith("pca moments2: up to 1e+11") for p in too_many)
    assert encoding_problems(JobSpec(features=("a",)), 20_000_000)[0].startswith("ae fit")


def test_init_cuts_a_series_and_the_deploy_path_reads_it(tmp_path):
    """``fedsyft init --time-column``: consecutive segments, the column recorded per site;
    provisioning reads each site's table in time order, whole (train = test)."""
    from datasites.deploy.config import load
    from datasites.deploy.init import write_example
    from datasites.deploy.provision import site_tables

    data = _csv(tmp_path, _nab("ec2_cpu_utilization_fe7f93", 500, 300), "series.csv")
    config = write_example(tmp_path / "fed", data, "anomaly", 2, 0, 8100,
                           time_column="timestamp")
    cfg = load(config)
    assert [s.time_column for s in cfg.site] == ["timestamp", "timestamp"]
    schema, splits = site_tables(cfg)
    assert schema.time == "timestamp" and schema.features == ("value",)
    (tr1, te1), (tr2, _) = splits.values()
    assert tr1 is te1 and len(tr1) == len(tr2) == 150
    assert tr1["timestamp"].max() < tr2["timestamp"].min()
