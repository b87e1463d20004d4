"""Batch scoring end to end: the real Prefect flow, real Dask, real GX, DuckDB and ONNX Runtime.

One local Dask cluster serves the whole module (the adapter reuses it); its workers are
threads of the test process, so ONNX Runtime and Great Expectations are imported once, except
for the tests about worker processes, which get a cluster of processes. Inputs are small and cut into several partitions,
so every run exercises the parallel path, the row-group slicing and the single commit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from adapters import dask_cluster, parquet_input, storage
from adapters.runtime import configure
from mlops.datagen import generate
from mlops.errors import ValidationFailed
from mlops.onnx_model import OnnxScorer
from mlops.partitions import plan_partitions
from mlops.settings import DaskConfig, Settings, load_settings
from tests.conftest import REPO, log_fixture_model

pytestmark = pytest.mark.integration

DAY = date(2026, 1, 2)
ROWS = 20_000
PARTITION_ROWS = 6_000  # 20k rows -> 4 partitions
KEYS = ["transaction_id", "user_id", "event_time"]


# --------------------------------------------------------------------------- pure decisions


def test_dates_inputs_and_thresholds_are_decided_without_any_backend(tmp_path: Path) -> None:
    """A backfill covers both ends and skips committed dates unless forced; inputs default to
    data/score/<date>.parquet or fill {date} in a template; the threshold is config, else the
    version's tag, else training's."""
    from mlops.errors import ConfigError
    from mlops.scoring import date_range, dates_to_score, decision_threshold, input_for, resolve_run_date

    days = date_range(date(2026, 1, 30), date(2026, 2, 2))
    assert [d.isoformat() for d in days] == ["2026-01-30", "2026-01-31", "2026-02-01", "2026-02-02"]
    assert dates_to_score(days, [days[1]], force=False) == ([days[0], days[2], days[3]], [days[1]])
    assert dates_to_score(days, [days[1]], force=True) == (days, [])
    with pytest.raises(ConfigError, match="before"):
        date_range(date(2026, 2, 2), date(2026, 2, 1))
    with pytest.raises(ConfigError, match="not a date"):
        resolve_run_date("2026-13-01", DAY)
    assert resolve_run_date(None, DAY) == DAY
    assert input_for(None, tmp_path, DAY) == tmp_path / "score" / "2026-01-02.parquet"
    assert input_for("/in/{date}/x.parquet", tmp_path, DAY) == Path("/in/2026-01-02/x.parquet")
    assert decision_threshold(0.5, {"decision_threshold": "0.3"}, 0.2) == 0.5
    assert decision_threshold(None, {"decision_threshold": "0.3"}, 0.2) == 0.3
    assert decision_threshold(None, {"decision_threshold": "junk"}, 0.2) == 0.2
    from mlops.scoring import session_threads

    # (cores, task threads) per worker host: sessions never ask for more threads than cores.
    assert session_threads(1, [(2, 2)]) == 1 and session_threads(4, [(2, 2)]) == 1
    assert session_threads(4, [(8, 2), (4, 2)]) == 2 and session_threads(2, [(2, 4)]) == 1


def test_failures_of_many_partitions_read_as_one_list() -> None:
    """The same problem in several partitions is listed once, naming where it was found."""
    from mlops.scoring import merge_failures

    lines = merge_failures(
        [
            (
                "partition 0 (input rows 0-9)",
                ["column 'a': values must be >= 0 (2 of 10 rows outside, e.g. -1.0)"],
            ),
            (
                "partition 1 (input rows 10-19)",
                [
                    "column 'a': values must be >= 0 (5 of 10 rows outside, e.g. -3.0)",
                    "column 'b' is missing",
                ],
            ),
        ]
    )
    assert lines == [
        "column 'a': values must be >= 0 (partition 0 (input rows 0-9) and 1 more partition: 2 of 10 rows outside, e.g. -1.0)",
        "column 'b' is missing (partition 1 (input rows 10-19))",
    ]


def test_arrow_columns_become_the_feeds_pandas_would_give(small_model: bytes, tmp_path: Path) -> None:
    """Feeding the scorer from Arrow columns (strings through their dictionary, or read
    dictionary-encoded from Parquet) gives the very scores of feeding it the pandas frame,
    nulls and all; the scored part carries provenance."""
    from mlops.scoring import ModelRef, column_arrays, score_table

    settings = load_settings(environ={})
    frame = generate(3_000, seed=21)
    frame.loc[5, "channel"] = None
    table = pa.Table.from_pandas(frame, preserve_index=False)
    scorer = OnnxScorer(small_model, settings.dataset)
    from_arrow = scorer.predict_proba(column_arrays(table, settings.dataset.feature_names))
    np.testing.assert_array_equal(from_arrow, scorer.predict_proba(frame))
    # Read as scoring workers read it (categoricals dictionary-encoded), and fed without the
    # per-row string check that column_arrays makes unnecessary: the same scores.
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=1_000)
    fed = []
    for part in plan_partitions(parquet_input.layouts(path), 2_000, min_rows=1):  # the first has the null
        read = parquet_input.read_partition(part, table.column_names, settings.dataset.categorical_names)
        assert pa.types.is_dictionary(read.schema.field("channel").type)
        arrays = column_arrays(read, settings.dataset.feature_names)
        assert all(set(map(type, arrays[c])) == {str} for c in settings.dataset.categorical_names)
        fed.append(scorer.run(scorer.feeds(arrays, strings_checked=True)))
    np.testing.assert_array_equal(np.concatenate(fed), from_arrow)
    part = score_table(table.select(KEYS), from_arrow, ModelRef("m", 3, "champion", 0.5, "d"), "run-1")
    assert part.column_names == [
        *KEYS,
        "score",
        "decision",
        "threshold",
        "model_name",
        "model_version",
        "alias",
        "flow_run_id",
    ]
    assert part.column("decision").to_pylist() == list(from_arrow >= 0.5)
    assert (
        set(part.column("model_version").to_pylist()) == {3}
        and part.schema.field("score").type == pa.float32()
    )
    # Constant strings are dictionary-encoded (one value); a run without a flow run id has nulls.
    assert part.column("model_name").type == pa.dictionary(pa.int32(), pa.string())
    assert set(part.column("alias").to_pylist()) == {"champion"}
    bare = score_table(table.select(KEYS), from_arrow, ModelRef("m", 3, "champion", 0.5, "d"), None)
    assert bare.schema == part.schema and bare.column("flow_run_id").null_count == bare.num_rows


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_cluster_per_module() -> Iterator[None]:
    yield
    dask_cluster.close_all()


@pytest.fixture(scope="session")
def challenger_model() -> bytes:
    """A second real model, trained on drifted data: it disagrees with ``small_model`` on some rows."""
    from mlops import modeling
    from mlops.settings import LogisticRegressionSpec

    settings = load_settings(environ={})
    frame = generate(3000, seed=5, drift=0.9)
    pipe = modeling.fit(LogisticRegressionSpec(C=0.05, max_iter=200), frame, settings.dataset, 0)
    return modeling.to_onnx_bytes(pipe, settings.dataset)


def register(settings: Settings, onnx_model: bytes, alias: str) -> int:
    """Log ``onnx_model`` in its own MLflow run, register it (as challenger) and point ``alias`` at it."""
    from registry.mlflow_registry import ModelRegistry

    logged = log_fixture_model(settings, onnx_model, f"fixture-{alias}")
    registry = ModelRegistry(settings)
    name = settings.training.model_name
    version = registry.register(
        name, logged.model_uri, logged.run_id, {"decision_threshold": "0.3"}, "fixture"
    ).version
    if alias != "challenger":
        registry.move_alias(name, alias, version, reason="fixture")
    return version


@pytest.fixture
def scoring_home(flow_home: Settings, monkeypatch: pytest.MonkeyPatch, small_model: bytes) -> Settings:
    """A platform with a champion (v1), small partitions, and the settings the flow will load.

    Its local Dask cluster runs its workers as threads of the test process: the same
    scheduler, tasks and partitions, without spawning worker processes that each import
    ONNX Runtime (and Great Expectations for a failing partition) again. Tests of what
    worker processes do (one session per process, a killed run's workers reused by a
    subprocess) ask for processes with ``worker_processes``.
    """
    monkeypatch.setenv("MLOPS__SCORING__ROWS_PER_PARTITION", str(PARTITION_ROWS))
    monkeypatch.setenv("MLOPS__DASK__PROCESSES", "false")
    settings = load_settings()
    configure(settings)
    register(settings, small_model, "champion")
    return settings


def worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Score on a local cluster of worker processes (as production does) from here on."""
    monkeypatch.setenv("MLOPS__DASK__PROCESSES", "true")


def write_input(
    path: Path, rows: int = ROWS, seed: int = 4, row_group_rows: int | None = None, day: date = DAY
) -> pd.DataFrame:
    frame = generate(rows, seed=seed, start=datetime(day.year, day.month, day.day))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_rows or rows
    )
    return frame


def scores_of(settings: Settings, day: date = DAY) -> pd.DataFrame:
    table = storage.query(
        settings.home_path, "SELECT * FROM scores WHERE run_date = ? ORDER BY transaction_id", [day]
    )
    return table.to_pandas()


def score_runs(settings: Settings) -> list[dict[str, object]]:
    return storage.query(settings.home_path, "SELECT * FROM score_runs ORDER BY run_date").to_pylist()


def run(settings: Settings, **kwargs: object):
    from flows.score import score_flow

    return score_flow(**({"run_date": DAY.isoformat()} | kwargs))


# --------------------------------------------------------------------------- a run


@pytest.mark.slow
def test_a_run_publishes_every_row_once_with_the_registered_models_scores(
    scoring_home: Settings, small_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a generated input of 1 million rows in 4 partitions, the run writes exactly 1
    million rows whose scores are the registered ONNX model's own on the same rows.

    DuckDB's count agrees, decisions use the version's threshold, every row carries the model,
    version, alias and flow run, the Hive layout is there, score_runs has the run, and each
    worker built its ONNX Runtime session once, not once per partition.
    """
    settings = scoring_home
    rows = 1_000_000
    worker_processes(monkeypatch)
    monkeypatch.setenv("MLOPS__SCORING__ROWS_PER_PARTITION", str(rows // 4))
    frame = write_input(
        settings.data_dir / "score" / f"{DAY}.parquet", rows=rows, row_group_rows=rows // 8
    )  # the default input
    summary = run(settings)

    assert (summary.rows_in, summary.rows_out, summary.partitions) == (rows, rows, 4)
    assert (
        storage.query(settings.home_path, "SELECT count(*) AS n FROM scores").column("n")[0].as_py() == rows
    )
    out = scores_of(settings)
    expected = frame.sort_values("transaction_id").reset_index(drop=True)
    assert out["transaction_id"].tolist() == expected["transaction_id"].tolist()
    assert out["user_id"].tolist() == expected["user_id"].tolist()
    direct = OnnxScorer(small_model, settings.dataset).predict_proba(expected)
    np.testing.assert_array_equal(out["score"].to_numpy(), direct)
    assert (out["decision"] == (out["score"] >= 0.3)).all() and out["threshold"].eq(0.3).all()
    assert set(out["model_name"]) == {"fraud-detector"} and set(out["model_version"]) == {1}
    assert set(out["alias"]) == {"champion"} and out["flow_run_id"].notna().all()

    parts = sorted((settings.home_path / "scores" / f"run_date={DAY}").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(4)]
    (row,) = score_runs(settings)
    assert (row["model_version"], row["alias"], row["rows_in"], row["rows_out"]) == (
        "1",
        "champion",
        rows,
        rows,
    )
    assert {"pin", "plan", "score", "workers_validate", "workers_score"} <= set(
        yaml.safe_load(row["phase_seconds"])
    )

    from tasks.scoring import scorer_loads

    digest = __import__("hashlib").sha256(small_model).hexdigest()[:16]
    loads = dask_cluster.client_for(load_settings().dask).run(scorer_loads)
    per_worker = [counts.get(digest, 0) for counts in loads.values()]
    assert 1 <= sum(per_worker) <= len(per_worker) < summary.partitions
    assert max(per_worker) == 1


def test_running_a_date_again_replaces_it_and_never_duplicates(
    scoring_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring the same date twice leaves one copy: the second run's rows, one score_runs row,
    one run folder. Four ONNX Runtime threads asked for on a cluster whose task threads
    already fill the cores give one thread per session (no oversubscription)."""
    settings = scoring_home
    monkeypatch.setenv("MLOPS__SCORING__ORT_THREADS", "4")
    path = settings.data_dir / "in.parquet"
    write_input(path, rows=12_000, row_group_rows=3_000)
    first = run(settings, input_path=str(path))
    client = dask_cluster.client_for(settings.dask)
    cores = dask_cluster.machine_cores()
    assert sum(client.nthreads().values()) >= cores  # a local cluster fills the machine
    threads = client.run(lambda: sorted({k[3] for k in __import__("tasks.scoring").scoring._scorers}))
    assert {t for ts in threads.values() for t in ts} == {1}
    second = run(settings, input_path=str(path))
    assert first.run_id != second.run_id
    assert len(scores_of(settings)) == 12_000
    runs = score_runs(settings)
    assert [r["run_id"] for r in runs] == [second.run_id]
    assert [p.name for p in (settings.home_path / "scores" / "_runs" / f"run_date={DAY}").iterdir()] == [
        second.run_id
    ]
    from mlops_cli.main import app

    runner = CliRunner()
    listed = runner.invoke(
        app,
        ["query", "SELECT count(*) AS n, count(DISTINCT flow_run_id) AS runs FROM scores", "--limit", "5"],
    )
    assert listed.exit_code == 0 and "12000" in listed.output and "1 rows" in listed.output, listed.output
    bad = runner.invoke(app, ["query", "SELECT nope FROM scores"])
    assert bad.exit_code == 3 and 'column "nope" not found' in bad.output and "Traceback" not in bad.output


def store_listing(settings: Settings) -> list[Path]:
    """Every file and folder of the score store, relative to the home."""
    return sorted(p.relative_to(settings.home_path) for p in (settings.home_path / "scores").rglob("*"))


def score_good_input(settings: Settings):
    """Score 8,000 valid rows for DAY; the run's summary and the store's listing after it."""
    good = settings.data_dir / "good.parquet"
    write_input(good, rows=8_000)
    return run(settings, input_path=str(good)), store_listing(settings)


def test_invalid_input_fails_listing_the_expectations_and_keeps_the_previous_output(
    scoring_home: Settings,
) -> None:
    """A run whose input breaks the GX suite raises ValidationFailed with each failed expectation;
    the date's committed run, its rows and the store's folders are exactly as before."""
    settings = scoring_home
    before, listing = score_good_input(settings)

    bad_frame = generate(8_000, seed=6)
    bad_frame.loc[7_000:7_010, "amount"] = -5.0
    bad_frame.loc[100:102, "channel"] = "carrier_pigeon"
    bad = settings.data_dir / "bad.parquet"
    pq.write_table(pa.Table.from_pandas(bad_frame, preserve_index=False), bad)
    with pytest.raises(ValidationFailed) as caught:
        run(settings, input_path=str(bad))
    text = str(caught.value)
    assert "nothing was written" in text
    assert any("column 'amount': values must be between 0.0 and 100000.0" in f for f in caught.value.failures)
    assert any(
        "column 'channel': values must be one of" in f and "carrier_pigeon" in f
        for f in caught.value.failures
    )

    assert [r["run_id"] for r in score_runs(settings)] == [before.run_id]
    assert len(scores_of(settings)) == 8_000
    assert store_listing(settings) == listing


def test_a_csv_input_is_scored_like_the_same_rows_in_parquet(
    scoring_home: Settings, small_model: bytes
) -> None:
    """A CSV export of a day's rows scores through the same flow as Parquet: every row once,
    with the registered model's scores, in several partitions; its Parquet copy is removed."""
    settings = scoring_home
    frame = generate(14_000, seed=8, start=datetime(DAY.year, DAY.month, DAY.day))
    csv = settings.data_dir / "export.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv, index=False)
    summary = run(settings, input_path=str(csv))

    assert (summary.rows_in, summary.rows_out, summary.partitions) == (14_000, 14_000, 3)
    out = scores_of(settings)
    expected = frame.sort_values("transaction_id").reset_index(drop=True)
    assert out["transaction_id"].tolist() == expected["transaction_id"].tolist()
    direct = OnnxScorer(small_model, settings.dataset).predict_proba(expected)
    np.testing.assert_allclose(out["score"].to_numpy(), direct, rtol=0, atol=1e-6)
    assert not list((settings.home_path / "tmp").glob("*"))


def test_a_malformed_csv_is_one_line_a_nonzero_exit_and_writes_nothing(scoring_home: Settings) -> None:
    """`mlops score` on a CSV with a ragged row, or with a value that is not a number, exits
    non-zero with one line naming the file (and the column); a CSV whose values break the
    suite lists the failed expectations. The store is exactly as before each time."""
    from mlops_cli.main import app

    settings = scoring_home
    before, listing = score_good_input(settings)

    frame = generate(8_000, seed=6)
    ragged = settings.data_dir / "ragged.csv"
    lines = frame.to_csv(index=False).splitlines()
    lines[5_000] = ",".join(lines[5_000].split(",")[:4])
    ragged.write_text("\n".join(lines) + "\n")
    text_cell = settings.data_dir / "text.csv"
    frame.astype({"amount": object}).assign(
        amount=lambda f: f["amount"].where(f.index != 7_000, "twelve")
    ).to_csv(text_cell, index=False)
    invalid = settings.data_dir / "invalid.csv"
    frame.assign(amount=lambda f: f["amount"].where(f.index % 100 != 0, -5.0)).to_csv(invalid, index=False)

    runner = CliRunner()
    for path, expected in [
        (ragged, "not a readable CSV file (CSV parse error: Expected"),
        (
            text_cell,
            "not a readable CSV file (column 'amount': CSV conversion error to double: "
            "invalid value 'twelve')",
        ),
        (invalid, "column 'amount': values must be between 0.0 and 100000.0"),
    ]:
        result = runner.invoke(app, ["score", "--date", DAY.isoformat(), "--input", str(path)])
        assert result.exit_code != 0, result.output
        assert expected in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
        assert [r["run_id"] for r in score_runs(settings)] == [before.run_id]
        assert len(scores_of(settings)) == 8_000
        assert store_listing(settings) == listing
        assert not list((settings.home_path / "tmp").glob("*"))
        if path == ragged:
            assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_replay_scores_both_aliases_and_writes_the_agreement_report(
    scoring_home: Settings, challenger_model: bytes, small_model: bytes
) -> None:
    """`--compare challenger` publishes the champion's scores and stores correlation, decision agreement,
    PSI, KS and per-segment differences between the two, equal to those computed directly."""
    from mlops.stats import decision_agreement, pearson

    settings = scoring_home
    register(settings, challenger_model, "challenger")
    path = settings.data_dir / "in.parquet"
    frame = write_input(path, rows=12_000)
    summary = run(settings, input_path=str(path), compare="challenger")
    assert summary.model_version == 1 and summary.compared_version == 2

    a = OnnxScorer(small_model, settings.dataset).predict_proba(frame)
    b = OnnxScorer(challenger_model, settings.dataset).predict_proba(frame)
    (report,) = storage.query(settings.home_path, "SELECT * FROM score_comparisons").to_pylist()
    assert (report["reference_version"], report["compared_version"], report["rows"]) == (1, 2, 12_000)
    assert report["correlation"] == pytest.approx(pearson(a, b), rel=1e-9)
    assert report["correlation"] < 0.999
    assert report["decision_agreement"] == pytest.approx(decision_agreement(a >= 0.3, b >= 0.3))
    assert report["psi"] > 0 and 0 < report["ks"] <= 1
    segments = storage.query(
        settings.home_path,
        "SELECT segment_value, rows, mean_diff FROM score_comparison_segments WHERE segment_column = 'channel' ORDER BY 1",
    ).to_pandas()
    by_channel = (
        frame.assign(d=b.astype(np.float64) - a.astype(np.float64))
        .groupby("channel")["d"]
        .agg(["size", "mean"])
        .sort_index()
    )
    assert segments["segment_value"].tolist() == by_channel.index.tolist()
    assert segments["rows"].tolist() == by_channel["size"].tolist()
    np.testing.assert_allclose(segments["mean_diff"], by_channel["mean"], rtol=1e-9, atol=1e-12)
    assert len(scores_of(settings)) == 12_000 and set(scores_of(settings)["model_version"]) == {1}


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_window_features_in_batch_equal_trainings_for_the_same_events_and_a_foreign_view_is_refused(
    scoring_home: Settings, window_model: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Given a champion trained on the window features of configs/features.yaml, a day's input
    and the events before it as history: each scored row carries the window features training
    computes from the same events (max abs diff 0 for counts), its score is the model's on
    them, and they land in the scored Parquet. A config declaring other windows is refused
    in one line naming both feature-view digests, before anything is scored."""
    from mlops.features import FeatureSet, FeatureViewMismatch, model_schema
    from mlops.training import training_frame
    from tests.conftest import FEATURES_YAML, register_window_model

    monkeypatch.setenv("MLOPS_CONFIG", str(FEATURES_YAML))
    settings = load_settings()
    fs = FeatureSet.from_settings(settings)
    register_window_model(settings, window_model, "champion", fs)
    day = generate(8_000, seed=31, start=datetime(DAY.year, DAY.month, DAY.day))
    day = day.sort_values("event_time", kind="stable").reset_index(drop=True)
    history, scored_rows = day.iloc[:5_000], day.iloc[5_000:]
    hist_path = tmp_path / "history" / "events.parquet"
    hist_path.parent.mkdir()
    history.to_parquet(hist_path, index=False)
    (settings.data_dir / "score").mkdir(parents=True, exist_ok=True)
    scored_rows.to_parquet(settings.data_dir / "score" / f"{DAY}.parquet", index=False)

    other = json.dumps([{"name": "user_txn_count_2h", "agg": "count", "window_seconds": 7200}])
    monkeypatch.setenv("MLOPS__FEATURES__WINDOWS", other)
    from mlops_cli.main import app

    refused = CliRunner().invoke(
        app,
        ["score", "--date", DAY.isoformat(), "--feature-history", str(tmp_path / "history" / "*.parquet")],
    )
    other_digest = FeatureSet.from_settings(load_settings()).digest()
    assert refused.exit_code == FeatureViewMismatch.exit_code == 2, refused.output
    message = " ".join(refused.output.split())  # the console wraps long lines
    assert f"trained on feature view {fs.digest()}" in message and f"declares {other_digest}" in message
    assert "Traceback" not in refused.output and not (settings.home_path / "warehouse.duckdb").exists()
    monkeypatch.delenv("MLOPS__FEATURES__WINDOWS")

    summary = run(settings, feature_history=str(tmp_path / "history" / "*.parquet"))
    assert summary.rows_out == len(scored_rows)
    out = scores_of(settings)
    expected = training_frame(day, fs, "events").iloc[5_000:]
    expected = expected.sort_values("transaction_id").reset_index(drop=True)
    assert out["transaction_id"].tolist() == expected["transaction_id"].tolist()
    for name in fs.names:
        diff = np.abs(out[name].to_numpy() - expected[name].to_numpy()).max()
        if name.startswith("user_txn_count"):
            assert diff == 0, name
        assert diff <= 1e-9 * max(1.0, np.abs(expected[name]).max()), (name, diff)
    assert expected["user_txn_count_24h"].max() > 1  # the history mattered
    direct = OnnxScorer(window_model, model_schema(settings.dataset, fs)).predict_proba(expected)
    np.testing.assert_array_equal(out["score"].to_numpy(), direct)
    part = pq.read_schema(next((settings.home_path / "scores" / f"run_date={DAY}").glob("part-*.parquet")))
    assert set(fs.names) <= set(part.names)


@pytest.mark.slow
def test_after_the_champion_moves_to_a_window_feature_model_every_night_commits(
    scoring_home: Settings, window_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a date scored by the plain champion, when the champion moves to a model that
    takes window features and the next two dates are scored with it (their rows carry the
    window feature columns), then every date is committed: ``scores`` has the union of the
    columns, NULL features for the plain date, and ``scores_on`` reads each date's rows."""
    from mlops.features import FeatureSet
    from tests.conftest import FEATURES_YAML, register_window_model

    days = [DAY, date(2026, 1, 3), date(2026, 1, 4)]
    inputs = {}
    for day in days:
        inputs[day] = scoring_home.data_dir / f"in-{day}.parquet"
        write_input(inputs[day], rows=3_000, seed=day.day, day=day)
    run(scoring_home, run_date=days[0].isoformat(), input_path=str(inputs[days[0]]))

    monkeypatch.setenv("MLOPS_CONFIG", str(FEATURES_YAML))
    settings = load_settings()
    fs = FeatureSet.from_settings(settings)
    register_window_model(settings, window_model, "champion", fs)
    for day in days[1:]:
        run(settings, run_date=day.isoformat(), input_path=str(inputs[day]))

    feature = fs.names[0]
    per_date = storage.query(
        settings.home_path,
        f'SELECT run_date, count(*) AS n, count("{feature}") AS f FROM scores GROUP BY ALL ORDER BY 1',
    )
    assert per_date.to_pylist() == [
        {"run_date": days[0], "n": 3_000, "f": 0},
        {"run_date": days[1], "n": 3_000, "f": 3_000},
        {"run_date": days[2], "n": 3_000, "f": 3_000},
    ]
    assert set(fs.names) <= set(
        storage.query(settings.home_path, "SELECT * FROM scores LIMIT 0").column_names
    )
    for day in days:
        one = storage.query(settings.home_path, "SELECT count(*) AS n FROM scores_on(?)", [day])
        assert one["n"].to_pylist() == [3_000]
    plain = storage.query(settings.home_path, "SELECT * FROM scores_on(?) LIMIT 0", [days[0]])
    assert feature not in plain.column_names


def test_backfill_skips_committed_dates_unless_forced(scoring_home: Settings) -> None:
    """`mlops score --from --to` scores each date of the range from its `{date}` input once; a second
    backfill skips them all, and --force rescores them."""
    from mlops_cli.main import app

    settings = scoring_home
    days = [date(2026, 1, 3), date(2026, 1, 4)]
    for i, d in enumerate(days):
        write_input(settings.data_dir / "daily" / f"{d}.parquet", rows=3_000, seed=10 + i, day=d)
    template = str(settings.data_dir / "daily" / "{date}.parquet")
    args = ["score", "--from", "2026-01-03", "--to", "2026-01-04", "--input", template]
    runner = CliRunner()

    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert [r["run_date"] for r in score_runs(settings)] == days
    ids = [r["run_id"] for r in score_runs(settings)]

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "skipped 2 committed dates" in again.output
    assert [r["run_id"] for r in score_runs(settings)] == ids

    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert all(new != old for new, old in zip([r["run_id"] for r in score_runs(settings)], ids, strict=True))
    assert (
        storage.query(settings.home_path, "SELECT count(*) AS n FROM scores").column("n")[0].as_py() == 6_000
    )


def test_missing_input_and_bad_options_are_one_line_errors(home: Settings) -> None:
    """Without an input for the date, `mlops score` names the expected file and how to generate it
    (exit 3); contradictory options exit 2. Nothing is started."""
    from mlops_cli.main import app

    runner = CliRunner()
    missing = runner.invoke(app, ["score", "--date", "2026-02-01"])
    assert missing.exit_code == 3
    assert f"{home.data_dir}/score/2026-02-01.parquet: no scoring input for 2026-02-01" in missing.output
    assert "mlops data generate --start 2026-02-01" in missing.output
    assert runner.invoke(app, ["score", "--from", "2026-02-01"]).exit_code == 2
    assert (
        runner.invoke(
            app, ["score", "--date", "2026-02-01", "--from", "2026-02-01", "--to", "2026-02-02"]
        ).exit_code
        == 2
    )


def test_every_prefect_deployment_imports_and_nightly_scoring_is_scheduled() -> None:
    """Each deployment in prefect.yaml names an importable flow that accepts its parameters and runs on
    the configured process pool; nightly scoring has a cron schedule and defaults its date to today."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pool = load_settings(environ={}).prefect.work_pool
    for dep in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
        assert set(dep.get("parameters") or {}) <= set(flow.parameters.properties), dep["name"]
        assert dep["work_pool"]["name"] == pool, dep["name"]
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly-scoring"]
    assert nightly["entrypoint"] == "flows/score.py:score_flow"
    scoring = load_flow_from_entrypoint(str(REPO / nightly["entrypoint"]))
    assert scoring.validate_parameters(nightly["parameters"])["run_date"] is None  # runs without any input
    (schedule,) = nightly["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert "run_date" not in nightly["parameters"]  # None -> the day the run starts
    assert {"format": "date", "type": "string"} in scoring.parameters.properties["run_date"][
        "anyOf"
    ]  # a date picker
    assert scoring.parameters.properties["alias"]["description"]  # the UI form explains each field
    assert {d["name"] for d in spec["deployments"]} == {
        "train",
        "nightly-scoring",
        "edge-export",
        "edge-refresh",
        "rollout",
        "compact-prediction-log",
        "stream-score",
    }
    for name in ("compact-prediction-log", "edge-refresh"):
        (dep,) = [d for d in spec["deployments"] if d["name"] == name]
        (schedule,) = dep["schedules"]
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    # a served release's timestamp is re-signed several times within its lifetime
    (refresh,) = [d for d in spec["deployments"] if d["name"] == "edge-refresh"]
    hours = refresh["schedules"][0]["cron"].split()[1]
    assert hours.startswith("*/") and int(hours[2:]) * 2 <= load_settings(environ={}).edge.timestamp_ttl_hours


def test_the_run_forms_offer_the_platforms_aliases_plans_and_budgets_and_accept_others() -> None:
    """Alias, candidate, plan and budget fields are a drop-down of the platform's own choices
    (the registry's aliases, the plans and budgets shipped in configs/) with a free-text
    alternative; both validate, and the drop-downs list exactly the files that exist."""
    from typing import get_args

    from prefect.flows import load_flow_from_entrypoint

    from flows.params import SHIPPED_BUDGETS, SHIPPED_PLANS
    from mlops.registry_model import ALIASES, ModelAlias

    assert get_args(ModelAlias) == ALIASES
    assert set(SHIPPED_PLANS) == {
        str(p.relative_to(REPO)) for p in (REPO / "configs" / "rollout").glob("*.yaml")
    }
    assert set(SHIPPED_BUDGETS) == {
        str(p.relative_to(REPO)) for p in (REPO / "configs" / "edge").glob("*.yaml")
    }
    flows = {
        d["name"]: load_flow_from_entrypoint(str(REPO / d["entrypoint"]))
        for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    }
    fields = {
        ("nightly-scoring", "alias"): ALIASES,
        ("nightly-scoring", "compare"): ALIASES,
        ("edge-export", "alias"): ALIASES,
        ("edge-export", "budget"): SHIPPED_BUDGETS,
        ("rollout", "candidate"): ALIASES,
        ("rollout", "plan"): SHIPPED_PLANS,
    }
    for (deployment, field), choices in fields.items():
        options = flows[deployment].parameters.properties[field]["anyOf"]
        assert [tuple(o["enum"]) for o in options if "enum" in o] == [choices], (deployment, field)
        assert {"type": "string"}.items() <= options[1].items(), (deployment, field)  # or typed in
        assert flows[deployment].validate_parameters({field: choices[0]})[field] == choices[0]
        assert (
            flows[deployment].validate_parameters({field: "team/own-choice.yaml"})[field]
            == "team/own-choice.yaml"
        )
    assert (
        flows["rollout"].validate_parameters({"candidate": "7"})["candidate"] == "7"
    )  # a version number stays text


# --------------------------------------------------------------------------- failures and scale-out


def _staged_parts(settings: Settings) -> list[Path]:
    """Parts staged so far by a running scoring run (none while its staging folders move)."""
    try:
        return list((settings.home_path / "scores" / "_staging").glob("*/part-*.parquet"))
    except FileNotFoundError:  # a run's temporary staging folder renamed while listed
        return []


@pytest.mark.slow
def test_a_killed_run_rerun_leaves_exactly_the_rows_of_a_clean_run(
    scoring_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlops score` SIGKILLed mid-run (a part staged, nothing committed): readers still see the previous
    run whole, no stray file is visible, and re-running leaves the very rows of a clean run with no
    staging behind."""
    from prefect.settings import PREFECT_API_URL

    settings = scoring_home
    worker_processes(monkeypatch)  # a scheduler on TCP, which the subprocess can reach
    path = settings.data_dir / "in.parquet"
    write_input(path, rows=24_000, row_group_rows=3_000)  # 8 partitions of 3k (PARTITION_ROWS is 6k, so 4)
    clean = run(settings, input_path=str(path))
    clean_rows = scores_of(settings)[["transaction_id", "user_id", "score", "decision"]]

    client = dask_cluster.client_for(load_settings().dask)  # the subprocess reuses our warm workers
    env = os.environ | {
        "MLOPS_HOME": str(settings.home_path),
        "MLOPS__DASK__ADDRESS": client.scheduler.address,
        "MLOPS__PREFECT__API_URL": str(PREFECT_API_URL.value()),
        "MLOPS__SCORING__ROWS_PER_PARTITION": "3000",
    }
    log = settings.home_path / "killed-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlops_cli.main",
                "score",
                "--date",
                DAY.isoformat(),
                "--input",
                str(path),
            ],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not _staged_parts(settings):
            assert proc.poll() is None, f"the run ended before it was killed: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no part was staged in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    assert [r["run_id"] for r in score_runs(settings)] == [clean.run_id]
    pd.testing.assert_frame_equal(scores_of(settings)[clean_rows.columns], clean_rows)
    hive = pq.ParquetDataset(settings.home_path / "scores" / f"run_date={DAY}").read()
    assert hive.num_rows == 24_000  # the pointer still names the clean run's folder only

    rerun = run(settings, input_path=str(path))
    assert rerun.rows_out == 24_000
    pd.testing.assert_frame_equal(scores_of(settings)[clean_rows.columns], clean_rows)
    assert [r["run_id"] for r in score_runs(settings)] == [rerun.run_id]
    time.sleep(1.0)  # let a task the killed driver had started finish and be refused
    assert _staged_parts(settings) == []
    runs = list((settings.home_path / "scores" / "_runs" / f"run_date={DAY}").iterdir())
    assert [p.name for p in runs] == [rerun.run_id]


class ExternalCluster:
    """`dask scheduler` and `dask worker --nworkers 2` on loopback, started when the module starts.

    The worker preloads the scoring task (ONNX Runtime, pyarrow; Great Expectations only
    loads for a failing partition) while the other tests run, so the test that uses it does
    not wait for a cold worker's imports.
    """

    def __init__(self, folder: Path):
        self.sched_file = folder / "scheduler.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.start(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(self.sched_file),
        )
        self.start(
            "worker",
            "--scheduler-file",
            str(self.sched_file),
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--memory-limit",
            "2GiB",
            "--preload",
            "tasks.scoring",
        )

    def start(self, *args: str) -> None:
        dask = str(Path(sys.executable).with_name("dask"))
        self.procs.append(
            subprocess.Popen(
                [dask, *args],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def address(self) -> str:
        """The scheduler's address once it and its worker are up."""
        import json

        from distributed import Client

        deadline = time.monotonic() + 120
        while not self.sched_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        address = json.loads(self.sched_file.read_text())["address"]
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
        return address

    def stop(self) -> None:
        for p in reversed(self.procs):
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module", autouse=True)
def external_cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ExternalCluster | None]:
    wanted = any(
        item.get_closest_marker("slow") and "existing_dask" in item.name for item in request.session.items
    )
    cluster = ExternalCluster(tmp_path_factory.mktemp("dask")) if wanted else None
    yield cluster
    if cluster is not None:
        if cluster.sched_file.exists():
            import json

            dask_cluster.release(DaskConfig(address=json.loads(cluster.sched_file.read_text())["address"]))
        cluster.stop()


@pytest.mark.slow
def test_the_flow_runs_on_an_existing_dask_scheduler_given_by_address(
    scoring_home: Settings,
    external_cluster: ExternalCluster | None,
    monkeypatch: pytest.MonkeyPatch,
    small_model: bytes,
) -> None:
    """With dask.address set to a scheduler started apart (`dask scheduler` + `dask worker
    --nworkers 2`), the same flow scores on that scheduler's workers. One worker is killed
    (SIGKILL) once the run has staged its first partition: its tasks move to the other worker
    (and to the worker's restart), and the run still publishes every row exactly once."""
    import threading

    from distributed import Client

    from flows.score import score_flow
    from tasks.scoring import scorer_loads

    assert external_cluster is not None
    address = external_cluster.address()
    monkeypatch.setenv("MLOPS__DASK__ADDRESS", address)
    settings = load_settings()
    assert settings.dask.address == address
    path = settings.data_dir / "in.parquet"
    frame = write_input(path, rows=60_000)  # 10 partitions of 6,000 rows
    with Client(address, timeout="30s") as client:
        pids = client.run(os.getpid)
    assert len(pids) == 2

    result: dict[str, object] = {}

    def score() -> None:
        try:
            result["summary"] = score_flow(run_date=DAY.isoformat(), input_path=str(path))
        except BaseException as exc:
            result["error"] = exc

    runner = threading.Thread(target=score)
    runner.start()
    deadline = time.monotonic() + 600
    while not _staged_parts(settings) and runner.is_alive():
        assert time.monotonic() < deadline, "no partition was staged"
        time.sleep(0.05)
    assert runner.is_alive(), f"the run ended before a worker could be killed: {result}"
    _, victim = sorted(pids.items())[0]
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=900)
    assert not runner.is_alive() and "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.rows_in == summary.rows_out == 60_000
    scored = scores_of(settings)
    assert len(scored) == 60_000 and scored["transaction_id"].is_unique
    assert set(scored["transaction_id"]) == set(frame["transaction_id"])
    assert not psutil_alive(victim)
    digest = __import__("hashlib").sha256(small_model).hexdigest()[:16]
    loads = dask_cluster.client_for(settings.dask).run(scorer_loads)
    assert all(counts.get(digest, 0) <= 1 for counts in loads.values())  # one session per worker process


def psutil_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
