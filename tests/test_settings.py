"""Configuration: strict, frozen, validated once, with errors naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlops.errors import ConfigError
from mlops.settings import Settings, env_overrides, load_settings, settings_digest

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_defaults_point_every_backend_into_home(tmp_path: Path) -> None:
    """Given only MLOPS_HOME, MLflow, the audit ledger, Prefect and DuckDB all live under it."""
    s = load_settings(environ={"MLOPS_HOME": str(tmp_path)})
    assert s.home == str(tmp_path.resolve())
    assert s.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert s.registry_uri == s.tracking_uri
    assert s.audit_db_uri.endswith(f"{tmp_path.resolve()}/registry_audit.db")
    assert s.prefect_home == tmp_path.resolve() / "prefect"
    assert s.warehouse_path == tmp_path.resolve() / "warehouse.duckdb"
    assert s.prefect.api_url is None and s.dask.address is None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    """Every YAML file shipped in configs/ is a valid platform config."""
    assert isinstance(load_settings(path, environ={}), Settings)


def test_platform_yaml_mirrors_the_embedded_defaults() -> None:
    """configs/platform.yaml spells out exactly the defaults used without a config file."""
    shipped = load_settings(Path("configs/platform.yaml").resolve(), environ={})
    assert settings_digest(shipped) == settings_digest(load_settings(environ={}))


def test_scaled_out_config_switches_each_backend() -> None:
    """The scaled-out example points Prefect, MLflow, Dask and the online service at servers
    by address; `mlops server up` then starts no model server of its own, hands the file to
    the flow runs of its worker, and the platform's serving client talks to the configured one."""
    from adapters.services import plan
    from serving.client import ServingClient

    s = load_settings(Path("configs/scaled-out.yaml").resolve(), environ={})
    assert s.prefect.api_url == "http://127.0.0.1:4200/api"
    assert s.tracking_uri == "http://127.0.0.1:5000"
    assert s.dask.address == "tcp://127.0.0.1:8786"
    assert s.serving_url == "http://127.0.0.1:3000"
    assert "serving" not in [svc.name for svc in plan(s)]
    assert "serving" in [svc.name for svc in plan(load_settings(environ={}))]
    # `mlops server up --config F`: the worker's flow runs load F too, so the nightly scoring
    # deployment reuses the scheduler at dask.address instead of starting a cluster per run.
    (worker,) = [svc for svc in plan(s, "configs/scaled-out.yaml") if svc.name == "prefect-worker"]
    assert worker.env["MLOPS_CONFIG"] == str(Path("configs/scaled-out.yaml").resolve())
    assert load_settings(environ=worker.env).dask.address == "tcp://127.0.0.1:8786"
    token = {"MLOPS__SERVING__ADMIN_TOKEN": "t" * 16}
    with ServingClient.for_settings(
        load_settings(Path("configs/scaled-out.yaml").resolve(), environ=token)
    ) as client:
        assert client.base_url == "http://127.0.0.1:3000"
    with pytest.raises(ConfigError, match=r"serving\.url"):
        load_settings(environ={"MLOPS__SERVING__URL": "not a url"})


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    """A typo in a field name fails with the file and the dotted field path."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  sed: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: training\.sed: Extra inputs are not permitted"):
        load_settings(bad, environ={})


def test_wrong_type_is_rejected_not_coerced(tmp_path: Path) -> None:
    """A string where an int belongs is an error (strict), not silently converted."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  seed: '7'\n")
    with pytest.raises(ConfigError, match=r"training\.seed"):
        load_settings(bad, environ={})


def test_unknown_model_kind_is_rejected(tmp_path: Path) -> None:
    """Candidates are a union discriminated on ``kind``; an unknown kind names the field."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  candidates:\n    - kind: xgboost\n")
    with pytest.raises(ConfigError, match=r"training\.candidates\.0"):
        load_settings(bad, environ={})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    """A missing file and broken YAML each give one line naming the file."""
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "nope.yaml", environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+ is not valid YAML"):
        load_settings(broken, environ={})


def test_env_overrides_are_typed_and_nested() -> None:
    """MLOPS__A__B=value overrides a nested field, with the value parsed as YAML."""
    env = {"MLOPS__DASK__N_WORKERS": "3", "MLOPS__MLFLOW__TRACKING_URI": "http://mlflow:5000", "OTHER": "x"}
    assert env_overrides(env) == {"dask": {"n_workers": 3}, "mlflow": {"tracking_uri": "http://mlflow:5000"}}
    s = load_settings(environ=env)
    assert s.dask.n_workers == 3 and s.tracking_uri == "http://mlflow:5000"


def test_bad_env_override_names_the_variable() -> None:
    """An override of the wrong type fails and says it came from the environment."""
    with pytest.raises(ConfigError, match=r"overrides.*dask\.n_workers"):
        load_settings(environ={"MLOPS__DASK__N_WORKERS": "many"})


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after validation."""
    s = load_settings(environ={})
    with pytest.raises(Exception, match="frozen"):
        s.training.seed = 1  # type: ignore[misc]


def test_dataset_schema_rejects_duplicate_columns(tmp_path: Path) -> None:
    """A column declared both as a feature and as the label is a config error."""
    bad = tmp_path / "dup.yaml"
    bad.write_text("dataset:\n  label_column: amount\n  numeric:\n    - name: amount\n  categorical: []\n")
    with pytest.raises(ConfigError, match="column names used twice: amount"):
        load_settings(bad, environ={})
