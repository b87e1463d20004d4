"""The stream follows the router: shadow, canary, ab and blue_green routes apply per event, with
the online service's pure ``route`` decision, and stay exactly-once across kills."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from adapters.broker import SqliteBroker
from mlops.datagen import generate
from mlops.errors import ConfigError
from mlops.features import FeatureSet
from mlops.modeling import fit, to_onnx_bytes
from mlops.onnx_model import OnnxScorer
from mlops.routing import InvalidRouteTable, RouteTable, route
from mlops.settings import LogisticRegressionSpec, RandomForestSpec, Settings, load_settings
from mlops.stream_routes import PART_METADATA_KEY, run_table
from tasks.stream import StreamConsumer, frame_messages, read_parts, write_part
from tests.support.stream import FEATURES_YAML, child_broker, kill_and_resume, stream_consumer

RUNNER = CliRunner()
TODAYS_COLUMNS = ["offset", "transaction_id", "user_id", "event_time"]
TODAYS_TAIL = ["score", "decision", "model_name", "model_version", "late"]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(FEATURES_YAML, environ={})


@pytest.fixture(scope="module")
def fs(settings: Settings) -> FeatureSet:
    return FeatureSet.from_settings(settings)


@pytest.fixture(scope="module")
def models(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real ONNX models, stable (logistic regression) and candidate (random forest), as files."""
    folder = tmp_path_factory.mktemp("models")
    stable = to_onnx_bytes(
        fit(LogisticRegressionSpec(), generate(5_000, seed=2), settings.dataset, seed=0), settings.dataset
    )
    cand = to_onnx_bytes(
        fit(
            RandomForestSpec(n_estimators=20, max_depth=6), generate(5_000, seed=3), settings.dataset, seed=1
        ),
        settings.dataset,
    )
    (folder / "stable.onnx").write_bytes(stable)
    (folder / "candidate.onnx").write_bytes(cand)
    return folder / "stable.onnx", folder / "candidate.onnx"


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    """4,000 generated transactions in time order."""
    return generate(4_000, seed=9).sort_values("event_time", kind="stable").reset_index(drop=True)


def _consumer(
    settings: Settings,
    fs: FeatureSet,
    models: tuple[Path, Path],
    home: Path,
    routes: RouteTable | None = None,
    with_candidate: bool = True,
    broker=None,
) -> StreamConsumer:
    stable, cand = models
    return stream_consumer(
        settings.dataset,
        fs,
        stable.read_bytes(),
        home,
        broker or SqliteBroker(home / "broker.db"),
        checkpoint_every=3,
        candidate=cand.read_bytes() if with_candidate else None,
        routes=routes,
    )


def _run(
    consumer: StreamConsumer, events: pd.DataFrame, settings: Settings, fs: FeatureSet, batch: int = 700
):
    consumer.broker.publish("tx", frame_messages(events, settings.dataset, fs))
    consumer.start()
    consumer.run(max_events=10**9, batch_size=batch)
    return read_parts(consumer.out_dir).to_pandas()


def _scores(model: Path, settings: Settings, events: pd.DataFrame) -> np.ndarray:
    return OnnxScorer(model.read_bytes(), settings.dataset).predict_proba(events).astype(np.float64)


def _within_binomial(k: int, n: int, pct: float) -> bool:
    """``k`` successes of ``n`` within 4.5 standard deviations of ``pct`` percent."""
    p = pct / 100
    return abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


def test_canary_share_is_within_binomial_bounds_sticky_per_entity_and_answered_by_the_routed_model(
    settings: Settings, fs: FeatureSet, models: tuple[Path, Path], events: pd.DataFrame, tmp_path: Path
) -> None:
    """Under a 30 % canary the share of entities on the candidate is within binomial bounds of
    30 %, every event of an entity goes to the same variant (the one the online ``route`` picks
    for that entity), each row's score, decision (at its variant's threshold) and version are
    the answering model's, the candidate scored only its rows, and each part records the routes."""
    table = RouteTable(mode="canary", weight_pct=30, salt="rollout-7")
    consumer = _consumer(settings, fs, models, tmp_path, table)
    out = _run(consumer, events, settings, fs)

    per_user = out.groupby("user_id")["variant"].nunique()
    assert (per_user == 1).all()
    users = out.drop_duplicates("user_id").set_index("user_id")["variant"]
    assert _within_binomial(int((users == "candidate").sum()), len(users), 30)
    assert len(users) > 300
    expected = [
        route(table, u, t).variant for u, t in zip(out["user_id"], out["transaction_id"], strict=True)
    ]
    assert out["variant"].tolist() == expected

    on_cand = (out["variant"] == "candidate").to_numpy()
    want = np.where(on_cand, _scores(models[1], settings, events), _scores(models[0], settings, events))
    np.testing.assert_allclose(out["score"], want, rtol=1e-6)
    assert (out["decision"] == (out["score"] >= np.where(on_cand, 0.3, 0.2))).all()
    assert out["model_version"].tolist() == np.where(on_cand, 2, 1).tolist()
    assert out["shadow_score"].isna().all() and out["shadow_version"].isna().all()
    parts = sorted(consumer.out_dir.glob("part-*.parquet"))
    meta = json.loads(pq.read_schema(parts[0]).metadata[PART_METADATA_KEY])
    assert meta == {
        "mode": "canary",
        "weight_pct": 30,
        "mirror_pct": 0.0,
        "salt": "rollout-7",
        "active_slot": "stable",
        "stable_version": 1,
        "candidate_version": 2,
    }
    assert consumer.routes.describe() == "canary 30% (salt rollout-7): stable v1, candidate v2"


def test_shadow_never_changes_decisions_and_records_the_candidate_for_the_mirrored_share(
    settings: Settings, fs: FeatureSet, models: tuple[Path, Path], events: pd.DataFrame, tmp_path: Path
) -> None:
    """Under a 20 % shadow the stable model answers every event exactly as a run without routes
    does; the events mirrored (by transaction id, as online) are within binomial bounds of 20 %
    and carry the candidate's score and version, the others nulls."""
    table = RouteTable(mode="shadow", mirror_pct=20, salt="rollout-8")
    out = _run(_consumer(settings, fs, models, tmp_path / "shadow", table), events, settings, fs)
    plain = _run(
        _consumer(settings, fs, models, tmp_path / "plain", with_candidate=False), events, settings, fs
    )

    for col in ("score", "decision", "model_version"):
        assert out[col].tolist() == plain[col].tolist(), col
    assert (out["variant"] == "stable").all()
    mirrored = np.array(
        [route(table, u, t).mirror for u, t in zip(out["user_id"], out["transaction_id"], strict=True)]
    )
    assert out["shadow_score"].notna().to_numpy().tolist() == mirrored.tolist()
    assert _within_binomial(int(mirrored.sum()), len(out), 20)
    np.testing.assert_allclose(
        out.loc[mirrored, "shadow_score"], _scores(models[1], settings, events)[mirrored], rtol=1e-6
    )
    assert (out.loc[mirrored, "shadow_version"] == 2).all()


def test_blue_green_answers_everything_from_the_active_slot(
    settings: Settings, fs: FeatureSet, models: tuple[Path, Path], events: pd.DataFrame, tmp_path: Path
) -> None:
    """A blue_green table with the candidate active routes every event to the candidate; the
    same table flipped back routes every event to stable."""
    green = RouteTable(mode="blue_green", active_slot="candidate")
    out = _run(_consumer(settings, fs, models, tmp_path / "green", green), events, settings, fs)
    assert (out["variant"] == "candidate").all() and (out["model_version"] == 2).all()
    np.testing.assert_allclose(out["score"], _scores(models[1], settings, events), rtol=1e-6)
    blue = _run(_consumer(settings, fs, models, tmp_path / "blue", green.flipped()), events, settings, fs)
    assert (blue["variant"] == "stable").all() and (blue["model_version"] == 1).all()
    np.testing.assert_allclose(blue["score"], _scores(models[0], settings, events), rtol=1e-6)


def test_single_routes_write_todays_parts_byte_for_byte(
    settings: Settings, fs: FeatureSet, models: tuple[Path, Path], events: pd.DataFrame, tmp_path: Path
) -> None:
    """A single-mode table, even with a candidate pinned, writes parts byte-identical to a
    consumer given no routes, with the columns a run without routes has always had."""
    single = _consumer(settings, fs, models, tmp_path / "single", RouteTable())
    assert single.candidate is None
    _run(single, events, settings, fs)
    _run(_consumer(settings, fs, models, tmp_path / "none", with_candidate=False), events, settings, fs)
    got = sorted((tmp_path / "single" / "out" / "scorer").glob("part-*.parquet"))
    want = sorted((tmp_path / "none" / "out" / "scorer").glob("part-*.parquet"))
    assert [p.name for p in got] == [p.name for p in want] and len(got) == 6
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in want]
    assert pq.read_schema(got[0]).names == [*TODAYS_COLUMNS, *fs.names, *TODAYS_TAIL]
    assert pq.read_schema(got[0]).metadata is None or PART_METADATA_KEY not in pq.read_schema(got[0]).metadata


def test_parts_without_routes_and_routed_parts_read_together_with_nulls(
    settings: Settings, fs: FeatureSet, models: tuple[Path, Path], events: pd.DataFrame, tmp_path: Path
) -> None:
    """A group that scored without routes and then with a canary reads back as one table (and
    one ``stream_scores`` view): the routed columns are null in the earlier rows."""
    from adapters.warehouse_query import query_stream

    first = _consumer(settings, fs, models, tmp_path, with_candidate=False)
    first.broker.publish("tx", frame_messages(events, settings.dataset, fs))
    first.start()
    first.run(max_events=1_000, batch_size=500)
    later = _consumer(settings, fs, models, tmp_path, RouteTable(mode="canary", weight_pct=50, salt="r"))
    later.start()
    later.run(max_events=10**9, batch_size=1_000)

    out = read_parts(later.out_dir).to_pandas()
    assert out["offset"].tolist() == list(range(len(events)))
    assert out["variant"].iloc[:1000].isna().all() and out["variant"].iloc[1000:].notna().all()
    got = query_stream(
        later.out_dir,
        "SELECT variant IS NULL AS unrouted, count(*) AS n FROM stream_scores GROUP BY 1 ORDER BY 1",
    )
    assert got.to_pylist() == [{"unrouted": False, "n": 3000}, {"unrouted": True, "n": 1000}]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(mode="canary", weight_pct=10, candidate_alias="challenger"), "needs a non-empty salt"),
        (dict(mode="canary", weight_pct=150, salt="s", candidate_alias="challenger"), "between 0 and 100"),
        (dict(mode="canary", weight_pct=10.001, salt="s", candidate_alias="challenger"), "two decimals"),
        (dict(mode="shadow", weight_pct=10, salt="s", candidate_alias="challenger"), "applies to canary"),
        (dict(mode="sideways", candidate_alias="challenger"), "mode must be one of"),
        (dict(mode="canary", weight_pct=10, salt="s"), "needs a candidate alias"),
        (dict(mode="single", candidate_alias="challenger"), "never scores a candidate"),
        (dict(mode="blue_green", active_slot="green", candidate_alias="c"), "active_slot must be"),
        (dict(mode="single", follow=True, candidate_alias="challenger"), "takes the versions and routes"),
    ],
)
def test_malformed_route_parameters_are_one_line_errors(params: dict, message: str) -> None:
    """Each malformed combination of route parameters is refused by name, in one line."""
    with pytest.raises(ConfigError, match=message) as err:
        run_table(
            params.get("follow", False),
            "champion",
            params.get("candidate_alias"),
            params["mode"],
            params.get("weight_pct", 0.0),
            params.get("mirror_pct", 0.0),
            params.get("salt", ""),
            params.get("active_slot", "stable"),
        )
    assert "\n" not in str(err.value)


def test_a_routed_consumer_without_a_candidate_is_refused(
    settings: Settings, fs: FeatureSet, models: tuple[Path, Path], tmp_path: Path
) -> None:
    """A canary table with no candidate model never builds a consumer."""
    with pytest.raises(InvalidRouteTable, match="canary routes need a candidate version"):
        _consumer(settings, fs, models, tmp_path, RouteTable(mode="canary", weight_pct=5, salt="s"), False)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        json.dumps({"model_name": "fraud-detector", "state": {"mode": "canary", "weight_pct": 10}}),
        json.dumps(
            {
                "model_name": "fraud-detector",
                "state": {"mode": "canary", "weight_pct": 10, "stable_version": 1},
            }
        ),
        json.dumps(
            {
                "model_name": "fraud-detector",
                "state": {"mode": "canary", "weight_pct": 10, "salt": "r", "stable_version": 1},
            }
        ),
        json.dumps(
            {"model_name": "fraud-detector", "state": {"mode": "single", "stable_version": 1, "evil": "x"}}
        ),
        None,
    ],
)
def test_stream_run_following_a_hostile_serving_state_writes_nothing(
    home: Settings, content: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlops stream run --follow-serving` with a missing, unreadable, malformed or inconsistent
    serving state (a canary without salt or candidate, an unknown field) exits non-zero with one
    line naming the file, before any part is written or any offset committed."""
    from flows.stream import broker_for, output_dir

    monkeypatch.setenv("MLOPS_CONFIG", str(FEATURES_YAML))
    settings = load_settings(FEATURES_YAML)
    published = RUNNER.invoke(app_(), ["stream", "publish", "--rows", "300", "--seed", "1"])
    assert published.exit_code == 0, published.output
    path = settings.run_dir / "serving-state.json"
    if content is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    result = RUNNER.invoke(app_(), ["stream", "run", "--follow-serving"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "serving-state.json" in result.output and "Traceback" not in result.output
    assert not output_dir(settings, "transactions", "scorer").exists()
    assert broker_for(settings).committed("transactions", "scorer") == 0


def test_stream_run_refuses_route_options_in_one_line(home: Settings) -> None:
    """Bad route options on `mlops stream run` exit 2 with one line, before any work."""
    for argv, message in (
        (
            ["--route-mode", "canary", "--weight-pct", "10", "--candidate-alias", "challenger"],
            "non-empty salt",
        ),
        (["--follow-serving", "--route-mode", "shadow"], "takes the versions and routes"),
        (["--candidate-alias", "challenger"], "never scores a candidate"),
    ):
        result = RUNNER.invoke(app_(), ["stream", "run", *argv])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def app_():
    from mlops_cli.main import app

    return app


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_a_killed_canary_consumer_writes_exactly_a_clean_canary_run(
    kind: str,
    redis_url: str,
    settings: Settings,
    fs: FeatureSet,
    models: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Under a 25 % canary, a consumer SIGKILLed at random moments and restarted each time ends
    with exactly the rows of a clean canary run (variants, versions, scores), on the embedded
    and the Redis broker: routing is a pure function of the pinned table and the event."""
    events = generate(12_000, seed=9).sort_values("event_time", kind="stable").reset_index(drop=True)
    routes = {"mode": "canary", "weight_pct": 25, "salt": "kill-test"}
    where = redis_url if kind == "redis" else "embedded"
    clean_home = tmp_path / f"clean{kind}"
    clean = _consumer(
        settings, fs, models, clean_home, RouteTable(**routes), broker=child_broker(clean_home, where)
    )
    expected = _run(clean, events, settings, fs, batch=500)
    assert 0 < (expected["variant"] == "candidate").mean() < 0.5

    home = tmp_path / f"killed{kind}"
    child_broker(home, where).publish("tx", frame_messages(events, settings.dataset, fs))
    kills = kill_and_resume(
        home,
        models[0],
        where,
        kills_wanted=5,
        seed=23,
        total=len(events),
        candidate_file=models[1],
        routes=routes,
    )
    assert kills == 5
    got = read_parts(home / "out" / "scorer").to_pandas()
    assert got["offset"].tolist() == list(range(len(events)))
    pd.testing.assert_frame_equal(got, expected)


def test_write_part_keeps_route_metadata(tmp_path: Path) -> None:
    """A part's schema metadata (the routes) survives the atomic write."""
    import pyarrow as pa

    table = pa.table({"offset": [0]}).replace_schema_metadata({PART_METADATA_KEY: b'{"mode": "canary"}'})
    path = write_part(tmp_path, table, 0, 1)
    assert pq.read_schema(path).metadata[PART_METADATA_KEY] == b'{"mode": "canary"}'


def test_a_candidate_on_another_feature_view_than_stable_is_refused(
    settings: Settings, fs: FeatureSet, models: tuple[Path, Path], tmp_path: Path
) -> None:
    """The stream computes one feature view for both models: a candidate trained on another
    declared view than stable's is refused in one line naming both digests."""
    import hashlib

    from adapters.feature_store import EmbeddedFeatureStore
    from mlops.features import FeatureViewMismatch, model_view
    from mlops.scoring import ModelRef
    from mlops.settings import WindowFeature

    other = fs.with_windows([WindowFeature(name="user_txn_count_2h", agg="count", window_seconds=7200.0)])
    stable, cand = (p.read_bytes() for p in models)
    cand_ref = ModelRef(
        "fraud-detector",
        2,
        "challenger",
        0.3,
        hashlib.sha256(cand).hexdigest()[:16],
        model_view(fs.lineage_tags()),
    )
    with pytest.raises(FeatureViewMismatch, match=f"{fs.digest()}.*{other.digest()}"):
        StreamConsumer(
            broker=SqliteBroker(tmp_path / "broker.db"),
            store=EmbeddedFeatureStore(tmp_path / "state", other, (fs,)),
            fs=other,
            schema=settings.dataset,
            scorer=OnnxScorer(stable, settings.dataset),
            model=ModelRef("fraud-detector", 1, "champion", 0.2, hashlib.sha256(stable).hexdigest()[:16]),
            out_dir=tmp_path / "out",
            topic="tx",
            group="scorer",
            extra_views=(fs,),
            routes=RouteTable(mode="canary", weight_pct=10, salt="s"),
            candidate=(OnnxScorer(cand, settings.dataset), cand_ref),
        )
