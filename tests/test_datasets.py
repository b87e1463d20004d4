"""Datasets the platform did not generate: any column names, CSV or Parquet, any model name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

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
    load_settings,
)

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
