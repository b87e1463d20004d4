"""Shared fixtures: a temporary MLOPS_HOME per test, fast training settings, one Prefect
API per run (shared by the xdist workers), and real MLflow-on-SQLite registries."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlops.settings import Settings, load_settings
from tests.support.models import log_fixture_model
from tests.support.prefect_api import SharedPrefectServer, ask_for_shared_api, prefect_api_for_tests

SHARED_PREFECT = pytest.StashKey[SharedPrefectServer]()

# Small but real candidates: the same code paths as production, in seconds.
FAST_CANDIDATES = [
    {"kind": "gradient_boosting", "n_estimators": 25, "max_depth": 3, "max_train_rows": 8000},
    {"kind": "logistic_regression"},
]
FAST_ENV = {
    "MLOPS__TRAINING__CANDIDATES": json.dumps(FAST_CANDIDATES),
    "MLOPS__TRAINING__LATENCY_REPEATS": "20",
    "MLOPS__TRAINING__LATENCY_BATCH_ROWS": "1000",
    "MLOPS__PROMOTION__WAIT_SECONDS": "60",
}
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Offline machine: no telemetry from any component, even before a fixture runs.
    for key, value in {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "BENTOML_DO_NOT_TRACK": "true",
    }.items():
        os.environ.setdefault(key, value)
    # The xdist controller (workers are started after this) owns the run's one Prefect API.
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        server = SharedPrefectServer()
        server.start_watching()
        config.stash[SHARED_PREFECT] = server


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(SHARED_PREFECT, None)
    if server is not None:
        server.stop()


# The longest modules first: CI runs two pytest-xdist workers that take whole modules
# (--dist loadfile, in collection order: --no-loadscope-reorder, or xdist would put the
# modules with the most tests first and the three-test end-to-end module last), so both
# start on long modules and the short ones fill in. The first five lead the whole suite
# (CI); the fast suite has no test in the first two and is led by the rest, longest first
# (alphabetical order would leave test_validation and test_train_flow for the end).
LONG_FIRST = (
    "test_rollout_flow.py",
    "test_e2e_deployments.py",
    "test_cli.py",
    "test_datasets.py",
    "test_scoring.py",
    "test_validation.py",
    "test_predlog_compaction.py",
    "test_train_flow.py",
    "test_serving_tenants.py",
    "test_storage.py",
    "test_serving_security.py",
    "test_stream_redis.py",
    "test_registry.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept
    if any("prefect_api" in getattr(item, "fixturenames", ()) for item in items):
        ask_for_shared_api()  # it starts while the first modules run


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once per session as MLflow creates one on first use
    (its schema migrations cost seconds, each time)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def seed_mlflow_store(state: Path, template: Path) -> None:
    """Give the platform in ``state`` a fresh copy of the empty MLflow store ``template``."""
    import shutil

    state.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, state / "mlflow.db")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path) -> Settings:
    """Settings of a fresh platform instance whose state lives in this test's tmp_path (its
    MLflow store a copy of the session's empty one)."""
    from adapters.runtime import configure

    state = tmp_path / "mlops-home"
    seed_mlflow_store(state, mlflow_template)
    monkeypatch.setenv("MLOPS_HOME", str(state))
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    for key in list(os.environ):
        if key.startswith("PREFECT_") and key not in {"PREFECT_API_URL", "PREFECT_HOME"}:
            monkeypatch.setenv(key, os.environ[key])  # restored after the test
    settings = load_settings()
    configure(settings)
    return settings


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """The run's temporary Prefect API: one server shared by the xdist workers, or Prefect's
    test harness in a single test process (starting one costs ~10 CPU-seconds)."""
    with prefect_api_for_tests():
        yield


@pytest.fixture
def flow_home(prefect_api: None, home: Settings) -> Settings:
    """``home`` plus the session's Prefect API, for tests that run flows."""
    return home


@pytest.fixture(scope="session")
def small_model() -> bytes:
    """A real (tiny) fraud model exported to ONNX, for registry tests that need versions."""
    from mlops import modeling
    from mlops.datagen import generate
    from mlops.settings import LogisticRegressionSpec

    settings = load_settings(environ={})
    frame = generate(3000, seed=3)
    pipe = modeling.fit(LogisticRegressionSpec(max_iter=200), frame, settings.dataset, 0)
    return modeling.to_onnx_bytes(pipe, settings.dataset)


def register_versions(settings: Settings, small_model: bytes, metrics: list[dict[str, float]]) -> list[int]:
    """Register one version per metrics dict, each with its own MLflow run.

    The ONNX model is logged once and shared by every version's source (logging a model
    costs seconds); each version still has a real run carrying its own metrics.
    """
    from mlflow.tracking import MlflowClient

    from registry.mlflow_registry import ModelRegistry

    logged = log_fixture_model(settings, small_model, "fixture-model")
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    registry = ModelRegistry(settings)
    versions = []
    for i, m in enumerate(metrics):
        run = client.create_run(logged.experiment_id, run_name=f"fixture-{i}")
        for key, value in m.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        versions.append(
            registry.register(
                settings.training.model_name, logged.model_uri, run.info.run_id, {}, "fixture"
            ).version
        )
    return versions


FEATURES_YAML = REPO / "configs" / "features.yaml"


@pytest.fixture(scope="session")
def window_model() -> bytes:
    """A real (tiny) fraud model that also takes the window features of configs/features.yaml,
    trained on features computed point-in-time the way the training flow computes them."""
    from mlops import modeling, training
    from mlops.datagen import generate
    from mlops.features import FeatureSet, model_schema
    from mlops.settings import LogisticRegressionSpec

    settings = load_settings(FEATURES_YAML, environ={})
    fs = FeatureSet.from_settings(settings)
    frame = training.training_frame(generate(3000, seed=3), fs, "fixture")
    schema = model_schema(settings.dataset, fs)
    pipe = modeling.fit(LogisticRegressionSpec(max_iter=300), frame, schema, 0)
    return modeling.to_onnx_bytes(pipe, schema)


def register_window_model(settings: Settings, onnx_model: bytes, alias: str, fs) -> int:
    """Register ``onnx_model`` with the lineage of feature view ``fs`` and point ``alias`` at it."""
    from mlops.features import model_schema
    from registry.mlflow_registry import ModelRegistry

    logged = log_fixture_model(settings, onnx_model, f"fixture-{alias}", model_schema(settings.dataset, fs))
    registry = ModelRegistry(settings)
    name = settings.training.model_name
    tags = fs.lineage_tags() | {"decision_threshold": "0.3"}
    version = registry.register(name, logged.model_uri, logged.run_id, tags, "fixture").version
    if alias != "challenger":
        registry.move_alias(name, alias, version, reason="fixture")
    return version


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's) on a free loopback port for one test module, started as
    `mlops server up` starts it (.ci/run installs the package when it is missing)."""
    import shutil

    from adapters.broker_redis import redis_ready, redis_server_command
    from adapters.services import free_port, started

    assert shutil.which("redis-server"), "redis-server is not installed (apt-get install -y redis-server)"
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    folder = tmp_path_factory.mktemp("redis")
    argv = redis_server_command("127.0.0.1", port, folder, "everysec")
    with started(argv, lambda: redis_ready(url), folder / "redis.log", timeout=20, name="redis-server"):
        yield url
