"""The stream-score flow and the `mlops stream` / `mlops features` commands, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from adapters.datasets import write_parquet
from mlops.datagen import generate
from mlops.features import FeatureSet, compute_offline
from mlops.settings import Settings, load_settings
from mlops_cli.main import app
from tests.conftest import register_versions

REPO = Path(__file__).resolve().parent.parent
FEATURES_YAML = str(REPO / "configs" / "features.yaml")
RUNNER = CliRunner()


def test_features_build_then_check_and_a_leak_fails_the_check(home: Settings, tmp_path: Path) -> None:
    """`mlops features build` writes a training set that `mlops features check` accepts; the same
    set with one feature taken at or after each row's time fails the check in one line, exit 3."""
    events = tmp_path / "events.parquet"
    write_parquet([generate(5_000, seed=4)], events)
    training = tmp_path / "training.parquet"
    built = RUNNER.invoke(app, ["features", "build", str(events), str(training), "-c", FEATURES_YAML])
    assert built.exit_code == 0, built.output
    assert "wrote 5,000 rows with 7 window features" in built.output
    ok = RUNNER.invoke(app, ["features", "check", str(training), "-c", FEATURES_YAML])
    assert ok.exit_code == 0, ok.output
    assert "point-in-time correct: 5,000 rows, 7 features" in ok.output

    frame = pd.read_parquet(training)
    fs = FeatureSet.from_settings(load_settings(FEATURES_YAML, environ={}))
    later = frame.assign(event_time=frame["event_time"] + pd.Timedelta(nanoseconds=1))
    frame["user_txn_count_24h"] = compute_offline(fs, frame, later).column("user_txn_count_24h").to_numpy()
    leaky = tmp_path / "leaky.parquet"
    write_parquet([frame], leaky)
    bad = RUNNER.invoke(app, ["features", "check", str(leaky), "-c", FEATURES_YAML])
    assert bad.exit_code == 3
    assert "not point-in-time correct" in bad.output and "user_txn_count_24h: 5000 of 5000 rows" in bad.output
    assert "Traceback" not in bad.output


def test_stream_commands_need_declared_features(home: Settings) -> None:
    """Without window features in the config, `mlops stream publish` says so in one line (exit 2)."""
    result = RUNNER.invoke(app, ["stream", "publish", "--rows", "10"])
    assert result.exit_code == 2
    assert "features.windows: no window features are declared" in result.output


@pytest.mark.slow
def test_stream_flow_scores_published_events_with_the_champion(
    flow_home: Settings, small_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a champion and 2,500 published transactions, two bounded `mlops stream run`s score
    every event once with the champion, the lag goes to 0, the window features equal the offline
    computation, and `mlops stream lookup` answers from the checkpoint."""
    from flows.stream import output_dir, stream_flow
    from registry.mlflow_registry import ModelRegistry
    from tasks.stream import read_parts

    [version] = register_versions(flow_home, small_model, [{"roc_auc": 0.9, "pr_auc": 0.2, "log_loss": 0.05}])
    ModelRegistry(flow_home).move_alias(
        flow_home.training.model_name, "champion", version, reason="stream test"
    )
    monkeypatch.setenv("MLOPS_CONFIG", FEATURES_YAML)
    published = RUNNER.invoke(app, ["stream", "publish", "--rows", "2500", "--seed", "6"])
    assert published.exit_code == 0, published.output
    assert "published 2,500 events to 'transactions' (end offset 2,500)" in published.output

    first = stream_flow(max_events=1_000, batch_size=400, config=FEATURES_YAML)
    assert (first.events, first.batches, first.next_offset, first.lag) == (1_000, 3, 1_000, 1_500)
    assert first.model == f"fraud-detector v{version}@champion"
    second = RUNNER.invoke(app, ["stream", "run", "--batch-size", "400"])
    assert second.exit_code == 0, second.output
    assert "1,500 events in 4 parts" in second.output and "lag 0" in second.output
    prom = (flow_home.home_path / "stream" / "metrics" / "transactions-scorer.prom").read_text()
    assert 'mlops_stream_lag_events{group="scorer",topic="transactions"} 0.0' in prom
    assert 'mlops_stream_run_events{group="scorer",topic="transactions"} 1500.0' in prom

    out = read_parts(output_dir(flow_home, "transactions", "scorer")).to_pandas()
    events = generate(2500, seed=6).sort_values("event_time", kind="stable").reset_index(drop=True)
    assert out["transaction_id"].tolist() == events["transaction_id"].tolist()
    fs = FeatureSet.from_settings(load_settings(FEATURES_YAML, environ={}))
    expected = compute_offline(fs, events).to_pandas()
    for name in fs.names:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-12, atol=1e-9, err_msg=name)
    assert (out["model_version"] == version).all()

    user = events["user_id"].iloc[-1]
    looked = RUNNER.invoke(app, ["stream", "lookup", user])
    assert looked.exit_code == 0, looked.output
    shown = {
        parts[0]: float(parts[1])
        for line in looked.output.splitlines()
        if len(parts := line.replace("│", " ").split()) == 2 and parts[0] in fs.names
    }
    now = pd.Timestamp(events["event_time"].max()) + pd.Timedelta(nanoseconds=1)
    direct = compute_offline(fs, events, pd.DataFrame({"user_id": [user], "event_time": [now]})).to_pylist()[
        0
    ]
    assert shown == pytest.approx(direct, rel=1e-5)


def test_stream_metrics_are_prometheus_text_with_lag_and_throughput() -> None:
    """A run's summary becomes Prometheus gauges labelled by topic and group: lag, offsets,
    events/s and counts."""
    from flows.stream import StreamSummary, metrics_text

    s = StreamSummary("tx", "g", "m v1@champion", 0, 0, 0, 3, 1_200, 5, 1_200, 2_000, "/x", seconds=0.5)
    text = metrics_text(s)
    assert 'mlops_stream_lag_events{group="g",topic="tx"} 800.0' in text
    assert 'mlops_stream_events_per_second{group="g",topic="tx"} 2400.0' in text
    assert 'mlops_stream_run_late_events{group="g",topic="tx"} 5.0' in text
    assert "# HELP mlops_stream_committed_offset" in text


@pytest.mark.slow
def test_stream_run_routes_by_explicit_options_and_by_the_serving_state(
    flow_home: Settings, small_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlops stream run --candidate-alias challenger --route-mode canary ...` answers each
    entity's events from one of champion and challenger (both versions in the output, the
    routes in the summary); a second group with `--follow-serving` takes the applied shadow
    state: the serving stable version answers, the candidate's scores fill the mirrored rows."""
    from flows.stream import output_dir
    from registry.mlflow_registry import ModelRegistry
    from serving.state import DesiredState, save_state, state_path
    from tasks.stream import read_parts

    v1, v2 = register_versions(flow_home, small_model, [{"roc_auc": 0.9}, {"roc_auc": 0.91}])
    registry = ModelRegistry(flow_home)
    name = flow_home.training.model_name
    registry.move_alias(name, "champion", v1, reason="stream routes test")
    registry.move_alias(name, "challenger", v2, reason="stream routes test")
    monkeypatch.setenv("MLOPS_CONFIG", FEATURES_YAML)
    assert RUNNER.invoke(app, ["stream", "publish", "--rows", "2000", "--seed", "6"]).exit_code == 0

    canary = RUNNER.invoke(
        app,
        ["stream", "run", "--candidate-alias", "challenger", "--route-mode", "canary"]
        + ["--weight-pct", "40", "--salt", "r1", "--batch-size", "500"],
    )
    assert canary.exit_code == 0, canary.output
    assert f"canary 40.0% (salt r1): stable v{v1}, candidate v{v2}" in canary.output
    out = read_parts(output_dir(flow_home, "transactions", "scorer")).to_pandas()
    assert len(out) == 2000 and set(out["model_version"]) == {v1, v2}
    assert (out.groupby("user_id")["variant"].nunique() == 1).all()
    assert ((out["variant"] == "candidate") == (out["model_version"] == v2)).all()

    desired = DesiredState(mode="shadow", mirror_pct=50, salt="r2", stable_version=v2, candidate_version=v1)
    save_state(state_path(load_settings(FEATURES_YAML)), name, desired, 1, None)
    shadow = RUNNER.invoke(app, ["stream", "run", "--follow-serving", "--group", "follower"])
    assert shadow.exit_code == 0, shadow.output
    assert f"shadow 50.0% mirrored (salt r2): stable v{v2}, candidate v{v1}" in shadow.output
    out = read_parts(output_dir(flow_home, "transactions", "follower")).to_pandas()
    assert (out["model_version"] == v2).all() and (out["variant"] == "stable").all()
    mirrored = out["shadow_score"].notna()
    assert 0.4 < mirrored.mean() < 0.6 and (out.loc[mirrored, "shadow_version"] == v1).all()
