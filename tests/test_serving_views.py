"""The online service during a dual-write window: a stable model on one feature view and a
candidate on another, both declared (``features.windows`` and ``features.extra_views``).

The service runs in-process (``ServingRuntime`` + the Starlette app over httpx's ASGI
transport) on a real MLflow-on-SQLite registry: v1 takes the seven windows of
configs/features.yaml, v2 the windows of view B (``VIEW_B``: one of them shared with the
first view under the same definition). The stream's checkpoint (``StreamFeatures`` over
both views + the configured store's ``save``) is in the embedded file or a real
redis-server. Expected scores come from each view's offline computation
(``compute_offline``) and each model scored directly with ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_serving_features import FEATURES_YAML, GROUP, STATE_EVENTS, TOPIC, queries, raw
from test_serving_security import serve

from adapters.feature_store import state_store
from mlops import modeling
from mlops.datagen import generate
from mlops.errors import ConfigError
from mlops.features import (
    FeatureSet,
    StreamFeatures,
    compute_offline,
    feature_views,
    model_schema,
    timestamps_ns,
)
from mlops.onnx_model import OnnxScorer
from mlops.settings import LogisticRegressionSpec, Settings, load_settings
from serving.state import DesiredState
from tests.conftest import register_window_model
from tests.support.serving import configured, env_reaching

VIEW_B = [
    {"name": "user_txn_count_24h", "agg": "count", "window_seconds": 86400},  # as in the first view
    {"name": "user_txn_count_2h", "agg": "count", "window_seconds": 7200},
    {"name": "user_amount_max_2h", "agg": "max", "column": "amount", "window_seconds": 7200},
    {"name": "user_amount_sum_3d", "agg": "sum", "column": "amount", "window_seconds": 3 * 86400},
]
EXTRA_VIEWS = json.dumps([{"windows": VIEW_B}])


@pytest.fixture(scope="module")
def views() -> tuple[FeatureSet, FeatureSet]:
    """View A (``features.windows``) and view B (the one extra view)."""
    a, b = feature_views(load_settings(FEATURES_YAML, environ={"MLOPS__FEATURES__EXTRA_VIEWS": EXTRA_VIEWS}))
    return a, b


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    """2,000 generated transactions in time order: the first 1,500 are in the stream state."""
    return generate(2000, seed=37).sort_values("event_time", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def models(views: tuple[FeatureSet, FeatureSet], events: pd.DataFrame) -> dict[str, tuple[bytes, OnnxScorer]]:
    """A logistic regression per view over the dataset's features plus that view's windows
    (ONNX inputs named like them), and its scorer for expected scores."""
    ds = load_settings(FEATURES_YAML, environ={}).dataset
    out = {}
    for key, fs in zip("AB", views, strict=True):
        schema = model_schema(ds, fs)
        frame = pd.concat([events, compute_offline(fs, events).to_pandas()], axis=1)
        onnx = modeling.to_onnx_bytes(
            modeling.fit(LogisticRegressionSpec(max_iter=300), frame, schema, 0), schema
        )
        out[key] = (onnx, OnnxScorer(onnx, schema))
    return out


@pytest.fixture(scope="module")
def registry_env(
    tmp_path_factory: pytest.TempPathFactory,
    views: tuple[FeatureSet, FeatureSet],
    models: dict[str, tuple[bytes, OnnxScorer]],
    mlflow_template: Path,
) -> dict[str, str]:
    """A registry whose champion v1 is the view-A model and challenger v2 the view-B model,
    each with its view's lineage tags; the environment that reaches it."""
    home = tmp_path_factory.mktemp("registry") / "home"
    with configured(home, mlflow_template, config=FEATURES_YAML) as (settings, _):
        assert register_window_model(settings, models["A"][0], "champion", views[0]) == 1
        assert register_window_model(settings, models["B"][0], "challenger", views[1]) == 2
    return env_reaching(settings) | {
        "MLOPS__SERVING__LOG_FLUSH_SECONDS": "60",
        "MLOPS__SERVING__ONLINE_FEATURES__REFRESH_SECONDS": "0.05",
        "MLOPS__SERVING__CANDIDATE_ALIAS": "challenger",
    }


@pytest.fixture(params=["embedded", "redis"])
def settings(request: pytest.FixtureRequest, registry_env: dict[str, str], tmp_path: Path) -> Settings:
    """Settings declaring both views, with the store of the parameter (Redis: its own prefix);
    lookups may take 2 s (the 0.25 s default can pass on a loaded CI machine)."""
    env = registry_env | {
        "MLOPS_HOME": str(tmp_path / "home"),
        "MLOPS__FEATURES__EXTRA_VIEWS": EXTRA_VIEWS,
        "MLOPS__SERVING__ONLINE_FEATURES__TIMEOUT_SECONDS": "2",
    }
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        env["MLOPS__FEATURES__STORE"] = (
            f"{{kind: redis, url: '{url}', prefix: 'v{os.getpid()}{tmp_path.name}'}}"
        )
    return load_settings(FEATURES_YAML, environ=env)


def publish(settings: Settings, events: pd.DataFrame) -> StreamFeatures:
    """What the stream does with both views declared: every event through one window state
    serving both, then a checkpoint in the configured store."""
    first, *extra = feature_views(settings)
    state = StreamFeatures(first, extra)
    state.replay(events["user_id"], timestamps_ns(events["event_time"]), {"amount": events["amount"]})
    state_store(settings, first, TOPIC, GROUP).save(state, {TOPIC: len(events)})
    return state


def offline_scores(
    views: tuple[FeatureSet, FeatureSet],
    models: dict[str, tuple[bytes, OnnxScorer]],
    events: pd.DataFrame,
    rows: pd.DataFrame,
) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """Per model, the offline features of ``rows`` (of its view) from the state's events, and its scores."""
    out = {}
    for key, fs in zip("AB", views, strict=True):
        feats = compute_offline(fs, events.iloc[:STATE_EVENTS], rows).to_pandas()
        out[key] = (feats, models[key][1].predict_proba(pd.concat([rows, feats], axis=1)))
    return out


def test_stable_and_candidate_on_different_views_score_with_their_own_features(
    settings: Settings,
    views: tuple[FeatureSet, FeatureSet],
    models: dict[str, tuple[bytes, OnnxScorer]],
    events: pd.DataFrame,
):
    """Given v1 trained on view A in the stable slot and v2 on view B in the candidate slot,
    a canary scores each raw transaction with the features of the serving model's own view,
    equal to the offline computation (one store read per request); in shadow mode the
    candidate's mirrored scores equal its offline ones too; OIP infer on v2 and a request
    that sends every feature of both views (no entity id) score alike."""
    a, b = views
    assert a.digest() != b.digest() and "user_txn_count_2h" not in a.names
    state = publish(settings, events.iloc[:STATE_EVENTS])
    rows, times = queries(events, state)
    want = offline_scores(views, models, events, rows)
    # the two models answer differently, and view B's windows move v2's score: a mix-up would show
    assert np.abs(want["A"][1] - want["B"][1]).max() > 1e-3
    empty = want["B"][0].iloc[[-1] * len(rows)].reset_index(drop=True)  # the entity never seen
    assert np.abs(models["B"][1].predict_proba(pd.concat([rows, empty], axis=1)) - want["B"][1]).max() > 1e-3
    schema = settings.dataset
    body = {"records": [raw(r, t, schema) for (_, r), t in zip(rows.iterrows(), times, strict=True)]}

    async def scenario() -> None:
        async with serve(settings) as s:
            rt = s.runtime
            assert rt.state.stable.view.digest() == a.digest()  # type: ignore[union-attr]
            assert rt.state.candidate.view.digest() == b.digest()  # type: ignore[union-attr]
            assert set(rt.state.candidate.windows) == set(b.names)  # type: ignore[union-attr]
            await rt.apply(
                DesiredState(
                    mode="canary", weight_pct=50.0, salt="views", stable_version=1, candidate_version=2
                )
            )
            reads = getattr(rt.online.reader, "reads", None)  # type: ignore[union-attr]
            got = await s.http.post("/predict", json=body)
            assert got.status_code == 200, got.text
            if reads is not None:  # Redis: one read for all entities of both views
                assert rt.online.reader.reads == reads + 1  # type: ignore[union-attr]
            preds = got.json()["predictions"]
            assert {p["variant"] for p in preds} == {"stable", "candidate"}
            _check(preds, want)
            # OIP infer on the candidate version: view B's features looked up for its raw tensors
            inputs = [
                {
                    "name": n,
                    "datatype": "BYTES"
                    if n in schema.categorical_names or n in ("user_id", "event_time")
                    else "FP32",
                    "shape": [1, 1],
                    "data": [v],
                }
                for n, v in body["records"][0]["features"].items()
            ]
            v2 = await s.http.post(
                "/v2/models/" + rt.model_name + "/versions/2/infer", json={"inputs": inputs}
            )
            assert v2.status_code == 200, v2.text
            assert v2.json()["outputs"][0]["data"][1] == pytest.approx(want["B"][1][0], abs=1e-6)
            # every feature of both views sent, no entity id: nothing is looked up
            full = []
            for i, rec in enumerate(body["records"]):
                feats = {k: v for k, v in rec["features"].items() if k not in ("user_id", "event_time")}
                full.append(
                    {"features": feats | want["A"][0].iloc[i].to_dict() | want["B"][0].iloc[i].to_dict()}
                )
            sent = await s.http.post("/predict", json={"records": full})
            assert sent.status_code == 200, sent.text
            _check(sent.json()["predictions"], want)
            # shadow: the stable answers, the candidate's mirrored score uses view B's features
            await rt.apply(
                DesiredState(
                    mode="shadow", mirror_pct=100.0, salt="views", stable_version=1, candidate_version=2
                )
            )
            shadow = await s.http.post("/predict", json=body)
            assert {p["variant"] for p in shadow.json()["predictions"]} == {"stable"}
            np.testing.assert_allclose(
                [p["score"] for p in shadow.json()["predictions"]], want["A"][1], atol=1e-6
            )
            for _ in range(200):
                if rt.shadow_pending == 0:
                    break
                await asyncio.sleep(0.02)
            ids = {p["request_id"]: i for i, p in enumerate(shadow.json()["predictions"])}
            logged = await asyncio.to_thread(_logged_shadow, rt, ids)
            assert len(logged) == len(rows)
            for i, score in logged.items():
                assert score == pytest.approx(want["B"][1][i], abs=1e-6), i

    asyncio.run(scenario())


def _check(preds: list[dict[str, Any]], want: dict[str, tuple[pd.DataFrame, np.ndarray]]) -> None:
    """Each answer is the offline score of the model that gave it: v1 on view A, v2 on view B."""
    for i, p in enumerate(preds):
        key = "A" if p["variant"] == "stable" else "B"
        assert p["model_version"] == (1 if key == "A" else 2)
        assert p["score"] == pytest.approx(want[key][1][i], abs=1e-6), (i, key)


def _logged_shadow(rt: Any, ids: dict[str, int]) -> dict[int, float]:
    """The candidate's mirrored scores of the request ids ``ids``, from the prediction log
    (flushed now)."""
    import pyarrow.dataset as pads

    rt.writer.flush()
    log = pads.dataset(rt.writer.predictions.root, format="parquet").to_table().to_pandas()
    log = log[(log["role"] == "shadow") & log["request_id"].isin(ids)]
    return {ids[r]: s for r, s in zip(log["request_id"], log["score"], strict=True)}


def test_an_undeclared_view_is_refused_and_clashing_names_are_a_config_error(
    registry_env: dict[str, str], views: tuple[FeatureSet, FeatureSet], tmp_path: Path
):
    """Without view B declared, the candidate trained on it is refused at load naming its
    digest; a config declaring one name in two views with different definitions does not load."""
    from serving.errors import UnusableModel
    from serving.runtime import ServingRuntime

    settings = load_settings(FEATURES_YAML, environ=registry_env | {"MLOPS_HOME": str(tmp_path / "home")})
    rt = ServingRuntime.for_model(settings, settings.training.model_name)
    with pytest.raises(UnusableModel) as err:
        rt.bootstrap()
    assert (
        "v2" in str(err.value) and views[1].digest() in str(err.value) and views[0].digest() in str(err.value)
    )
    clash = json.dumps(
        [{"windows": [{"name": "user_txn_count_24h", "agg": "count", "window_seconds": 7200}]}]
    )
    with pytest.raises(
        ConfigError, match="'user_txn_count_24h' is declared in features.windows with another definition"
    ):
        load_settings(FEATURES_YAML, environ={"MLOPS__FEATURES__EXTRA_VIEWS": clash})
