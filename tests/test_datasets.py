"""Datasets the platform did not generate: any column names, CSV or Parquet, any model name."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from mlops import modeling
from mlops.errors import ConfigError
from mlops.feature_names import onnx_input_name, onnx_input_names
from mlops.onnx_model import OnnxScorer
from mlops.settings import (
    CategoricalFeature,
    DatasetSchema,
    GradientBoostingSpec,
    LogisticRegressionSpec,
    NumericFeature,
    Settings,
    load_settings,
)

DATASET_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "datasets").glob("*.yaml"))
DAY = "2026-01-02"

# Spaces, dots, parentheses, a slash, accents, a non-Latin script and a leading digit.
ODD_NUMERIC = ("mean radius", "od280/od315", "sepal length (cm)", "température", "温度", "2nd.reading")
ODD_CATEGORICAL = "card type"


def odd_schema() -> DatasetSchema:
    """A dataset whose column names are anything but identifiers."""
    return DatasetSchema(
        name="Odd Names",
        id_column="row id",
        entity_column="customer no.",
        timestamp_column=None,
        label_column="is bad?",
        numeric=tuple(NumericFeature(name=n, min=-10.0, max=10.0) for n in ODD_NUMERIC),
        categorical=(CategoricalFeature(name=ODD_CATEGORICAL, categories=("débit", "crédit", "prepaid")),),
        min_rows=10,
    )


def odd_frame(rows: int, seed: int) -> pd.DataFrame:
    """Rows of ``odd_schema`` with a label that depends on several features."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"row id": np.arange(rows), "customer no.": [f"c{i % 37}" for i in range(rows)]})
    for name in ODD_NUMERIC:
        frame[name] = rng.normal(0.0, 1.5, rows).clip(-10, 10)
    frame[ODD_CATEGORICAL] = rng.choice(["débit", "crédit", "prepaid"], rows)
    logit = frame["mean radius"] - 0.8 * frame["温度"] + 1.2 * (frame[ODD_CATEGORICAL] == "prepaid") - 0.3
    frame["is bad?"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return frame


# --------------------------------------------------------------------------- the mapping


def test_column_names_map_to_onnx_identifiers_by_one_rule() -> None:
    """Every column name becomes a C identifier; identifiers stay as they are."""
    assert onnx_input_name("mean radius") == "mean_radius"
    assert onnx_input_name("od280/od315") == "od280_od315"
    assert onnx_input_name("sepal length (cm)") == "sepal_length__cm_"
    assert onnx_input_name("température") == "temperature"
    assert onnx_input_name("温度") == "u6e29u5ea6"
    assert onnx_input_name("2nd.reading") == "_2nd_reading"
    assert onnx_input_name("") == "_"
    for identifier in ("amount", "hour_of_day", "_x1", "CamelCase"):
        assert onnx_input_name(identifier) == identifier
    for name in ODD_NUMERIC:
        mapped = onnx_input_name(name)
        assert mapped.isascii() and mapped.isidentifier(), mapped


def test_two_columns_that_map_to_one_input_are_refused_when_declared(tmp_path) -> None:
    """A dataset declaring "a b" and "a_b" is a config error naming both columns."""
    with pytest.raises(ValueError, match="'a b' and 'a_b' both become ONNX input 'a_b'"):
        onnx_input_names(["a b", "a_b"])
    config = tmp_path / "clash.yaml"
    config.write_text(
        "dataset:\n  name: clash\n  numeric:\n    - {name: a b}\n    - {name: a_b}\n"
        "training: {model_name: m}\n"
    )
    with pytest.raises(ConfigError, match=r"clash\.yaml: dataset: .*'a b' and 'a_b' both become"):
        load_settings(config, environ={})


@pytest.mark.parametrize(
    "spec", [LogisticRegressionSpec(), GradientBoostingSpec(n_estimators=20)], ids=lambda s: s.kind
)
def test_a_model_of_odd_column_names_exports_and_scores_by_column_name(spec) -> None:
    """A pipeline fitted on columns with spaces, dots, unicode and leading digits exports to
    ONNX with identifier inputs, is fed by the dataset's own column names, and reproduces
    scikit-learn's probabilities."""
    schema = odd_schema()
    frame = odd_frame(1500, seed=1)
    pipe = modeling.fit(spec, frame, schema, seed=0)
    scorer = OnnxScorer(modeling.to_onnx_bytes(pipe, schema), schema)
    graph_inputs = [i.name for i in scorer.session.get_inputs()]
    assert graph_inputs == [onnx_input_name(n) for n in schema.feature_names]
    assert [(t.name, t.onnx_name) for t in scorer.inputs] == list(schema.input_names.items())
    result = modeling.parity(pipe, scorer, frame.head(300), tolerance=1e-5)
    assert result.ok, result
    record = {n: [frame[n].iloc[0]] for n in schema.feature_names}  # one online-style record
    assert scorer.predict_proba(record)[0] == pytest.approx(scorer.predict_proba(frame.head(1))[0])


# --------------------------------------------------------------------------- model name


def test_the_registered_model_is_named_after_the_dataset_unless_config_says_otherwise(tmp_path) -> None:
    """A declared dataset names its model (``dataset.model_name``, else a slug of its name);
    ``training.model_name`` overrides both; the experiment follows the model name; the
    embedded demo dataset still registers ``fraud-detector``."""
    dataset = "dataset:\n  name: Breast Cancer (Wisconsin)\n  label_column: target\n  numeric: [{name: mean radius}]\n"
    config = tmp_path / "bc.yaml"
    config.write_text(dataset)
    derived = load_settings(config, environ={})
    assert (derived.training.model_name, derived.training.experiment) == ("breast-cancer-wisconsin",) * 2

    config.write_text(dataset + "  model_name: tumour-classifier\n")
    assert load_settings(config, environ={}).training.model_name == "tumour-classifier"

    config.write_text(dataset + "training:\n  model_name: custom\n")
    named = load_settings(config, environ={})
    assert (named.training.model_name, named.training.experiment) == ("custom", "custom")
    assert load_settings(config, environ={"MLOPS__TRAINING__EXPERIMENT": "exp"}).training.experiment == "exp"

    demo = load_settings(environ={})
    assert (demo.training.model_name, demo.training.experiment) == ("fraud-detector", "fraud-detector")


# --------------------------------------------------------------------------- end to end


def _records(frame: pd.DataFrame, schema: DatasetSchema) -> list[dict]:
    """Online-request records of ``frame``, keyed by the dataset's column names."""
    return [
        {"features": {n: (float(r[n]) if n in schema.numeric_names else r[n]) for n in schema.feature_names}}
        for r in frame.to_dict("records")
    ]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(2400)
def test_odd_column_names_give_the_same_scores_in_training_batch_and_online(
    flow_home: Settings, tmp_path: Path
) -> None:
    """A CSV dataset whose columns hold spaces, dots, unicode and leading digits trains and
    registers under its own name, scores in batch from CSV, and is served online (/predict
    and OIP v2 infer, by column name): all three give the registered ONNX model's scores."""
    from test_serving_service import _start

    from adapters import storage
    from adapters.services import free_port, terminate
    from flows.score import score_flow
    from flows.train import train_flow
    from registry.mlflow_registry import ModelRegistry

    schema = odd_schema()
    config = tmp_path / "odd.yaml"
    config.write_text(
        yaml.safe_dump(
            {"dataset": schema.model_dump(mode="json"), "scoring": {"rows_per_partition": 700}},
            allow_unicode=True,
        )
    )
    train_csv = tmp_path / "train.csv"
    odd_frame(3000, seed=2).to_csv(train_csv, index=False)
    summary = train_flow(str(train_csv), str(config))
    settings = load_settings(config)
    assert summary.model_name == settings.training.model_name == "odd-names"
    assert summary.promoted_to_champion
    scorer = OnnxScorer(ModelRegistry(settings).onnx_bytes("odd-names", summary.version), schema)

    score_in = odd_frame(2000, seed=3).drop(columns=["is bad?"])
    score_csv = tmp_path / "score.csv"
    score_in.to_csv(score_csv, index=False)
    run = score_flow(run_date=DAY, input_path=str(score_csv), config=str(config))
    assert (run.rows_out, run.partitions, run.model_name) == (2000, 3, "odd-names")
    batch = storage.query(settings.home_path, 'SELECT "row id", score FROM scores ORDER BY "row id"')
    batch = batch.to_pandas()
    assert batch["row id"].tolist() == list(range(2000))
    np.testing.assert_allclose(batch["score"], scorer.predict_proba(score_in), rtol=0, atol=1e-6)

    env = dict(os.environ) | {"MLOPS_CONFIG": str(config)}
    port = free_port()
    proc = _start(settings, env, port, tmp_path / "service.log")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            rows = score_in.head(25)
            answer = http.post("/predict", json={"records": _records(rows, schema)})
            assert answer.status_code == 200, answer.text
            online = [p["score"] for p in answer.json()["predictions"]]
            np.testing.assert_allclose(online, batch["score"][:25], rtol=0, atol=1e-6)

            meta = http.get("/v2/models/odd-names").json()
            assert [i["name"] for i in meta["inputs"]] == list(schema.feature_names)
            inputs = [
                {
                    "name": i["name"],
                    "datatype": i["datatype"],
                    "shape": [len(rows), 1],
                    "data": [float(v) if i["datatype"] == "FP32" else v for v in rows[i["name"]]],
                }
                for i in meta["inputs"]
            ]
            infer = http.post("/v2/models/odd-names/infer", json={"inputs": inputs})
            assert infer.status_code == 200, infer.text
            [probs] = infer.json()["outputs"]
            np.testing.assert_allclose(
                np.asarray(probs["data"]).reshape(-1, 2)[:, 1], batch["score"][:25], rtol=0, atol=1e-6
            )
    finally:
        terminate(proc)


@pytest.mark.parametrize("path", DATASET_CONFIGS, ids=[p.name for p in DATASET_CONFIGS])
def test_every_shipped_dataset_declaration_loads(path: Path) -> None:
    """Each config under configs/datasets/ is a valid platform config whose model is named for its dataset."""
    settings = load_settings(path, environ={})
    assert settings.training.model_name == settings.dataset.default_model_name
    assert settings.training.model_name != "fraud-detector"


def _bundled(name: str) -> tuple[pd.DataFrame, Path]:
    """A bundled scikit-learn table as the platform's users would export it, and its declaration.

    Rows keep their number as "sample id"; wine's three cultivars become a yes/no label.
    """
    from sklearn import datasets as sk

    if name == "breast-cancer":
        frame = sk.load_breast_cancer(as_frame=True).frame
    else:
        frame = sk.load_wine(as_frame=True).frame
        frame["is cultivar 0"] = (frame.pop("target") == 0).astype(np.int64)
    frame = frame.rename_axis("sample id").reset_index()
    return frame, Path(__file__).resolve().parent.parent / "configs" / "datasets" / f"{name}.yaml"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(2400)
@pytest.mark.parametrize(
    ("name", "train_format", "model"),
    [("breast-cancer", "parquet", "breast-cancer"), ("wine", "csv", "wine-cultivar-0")],
)
def test_bundled_scikit_learn_tables_train_and_score_through_the_cli(
    prefect_api: None, tmp_path: Path, name: str, train_format: str, model: str
) -> None:
    """`mlops train --data ... --config configs/datasets/<name>.yaml` then `mlops score` on a
    CSV export: the model registers under the dataset's name, every row is scored once with
    the champion's own scores, and nothing is named fraud-detector."""
    from prefect.settings import PREFECT_API_URL
    from test_cli import mlops

    from adapters import storage
    from adapters.datasets import write_parquet
    from adapters.runtime import configure
    from registry.mlflow_registry import ModelRegistry

    frame, config = _bundled(name)
    home = tmp_path / "home"
    api = PREFECT_API_URL.value()
    env = {"MLOPS_HOME": str(home), "MLOPS__PREFECT__API_URL": api, "PREFECT_API_URL": api}
    data = tmp_path / f"{name}.{train_format}"
    if train_format == "csv":
        frame.to_csv(data, index=False)
    else:
        write_parquet([frame], data)
    trained = mlops("train", "--data", str(data), "--config", str(config), env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert model in trained.stdout

    export = tmp_path / f"{name}-score.csv"
    frame.drop(columns=[frame.columns[-1]] if name == "wine" else ["target"]).to_csv(export, index=False)
    scored = mlops("score", "--date", DAY, "--input", str(export), "--config", str(config), env=env)
    assert scored.returncode == 0, scored.stderr[-3000:]

    settings = load_settings(config, environ={"MLOPS_HOME": str(home)})
    saved = dict(os.environ)
    try:  # configure() points MLflow at this home through os.environ: restore it after
        configure(settings)
        registry = ModelRegistry(settings)
        assert registry.aliases(model)["champion"] == 1 and not registry.exists("fraud-detector")
        scorer = OnnxScorer(registry.onnx_bytes(model, 1), settings.dataset)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = storage.query(
        home, 'SELECT "sample id", score, model_name FROM scores ORDER BY "sample id"'
    ).to_pandas()
    assert out["sample id"].tolist() == frame["sample id"].tolist()
    assert set(out["model_name"]) == {model}
    np.testing.assert_allclose(out["score"], scorer.predict_proba(frame), rtol=0, atol=1e-6)


def test_csv_cells_are_typed_by_the_declaration(tmp_path) -> None:
    """A CSV reads numeric features as numbers and categorical ones as strings, whatever they
    look like; empty cells and NA markers are nulls, unless the marker is a declared category."""
    from adapters.datasets import read_frame

    schema = DatasetSchema(
        name="typed",
        id_column="id",
        entity_column=None,
        timestamp_column=None,
        label_column="y",
        numeric=(NumericFeature(name="x 1", max_null_fraction=1.0),),
        categorical=(
            CategoricalFeature(name="code", categories=("1", "2")),
            CategoricalFeature(name="region", categories=("EU", "NA"), max_null_fraction=1.0),
        ),
    )
    csv = tmp_path / "typed.csv"
    csv.write_text("id,x 1,code,region,y\n1,3,1,NA,0\n2,,2,,1\n3,NaN,1,EU,0\n")
    frame = read_frame(csv, schema)
    assert frame["x 1"].dtype == np.float64 and frame["x 1"].isna().tolist() == [False, True, True]
    assert frame["code"].tolist() == ["1", "2", "1"]
    assert frame["region"].isna().tolist() == [False, True, False]
    assert frame["region"][0] == "NA" and frame["region"][2] == "EU"
