"""The promotion gate scores champion and candidate on the same rows, with real MLflow and ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from adapters.datasets import write_parquet
from mlops import evaluation
from mlops.errors import GateFailed
from mlops.gates import Outcome, promotion_gate
from mlops.registry_model import CHALLENGER, CHAMPION
from mlops.settings import Settings, load_settings
from mlops.tenancy import tenant_model_name
from registry.mlflow_registry import ModelRegistry
from registry.promotion import champion_gate, promote
from tests.conftest import register_versions
from tests.support.cli import run_cli
from tests.support.promotion import World, register_trained, world

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rows() -> World:
    return world(load_settings(environ={}).dataset)


def _logged_verdict(settings: Settings, name: str, candidate: int, champion: int) -> Outcome:
    registry = ModelRegistry(settings)
    logged = registry.version(name, candidate).metrics
    return promotion_gate(settings.promotion.gates, logged, registry.version(name, champion).metrics).outcome


def test_a_candidate_whose_own_rows_flatter_it_fails_on_the_same_rows(home: Settings, rows: World) -> None:
    """Given a champion evaluated on ordinary rows and a noisier candidate whose own holdout holds
    only easy rows (its logged metrics beat the champion's), when it is promoted, then the gate
    scores both on the candidate's holdout, refuses it on roc_auc and moves nothing; `mlops
    promote` says so in one line with the evaluation set and both versions' metrics (exit 6)."""
    name = home.training.model_name
    champion, _ = register_trained(home, rows.good, rows.train, rows.normal)
    candidate, _ = register_trained(home, rows.noisy, rows.train, rows.easy)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    assert _logged_verdict(home, name, candidate, champion) is Outcome.PASS
    with pytest.raises(
        GateFailed, match=r"roc_auc 0\.9\d+ vs champion 1\.0000 .*holdout of v2 sha256"
    ) as err:
        promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="claims better")
    assert f"{len(rows.easy)} rows" in str(err.value) and "\n" not in str(err.value)
    args = ["--alias", CHAMPION, "--version", str(candidate), "--reason", "claims better"]
    cli = run_cli(os.environ.copy(), "promote", *args, timeout=300)
    [line] = [x for x in cli.stderr.splitlines() if "not promoted" in x]
    assert (
        cli.returncode == 6
        and "(evaluated on holdout of v2 sha256" in line
        and "champion v1: roc_auc 1.0000" in line
    )
    assert registry.aliases(name) == {CHAMPION: champion, CHALLENGER: candidate}


def test_a_candidate_held_out_on_harder_rows_passes_on_the_same_rows(home: Settings, rows: World) -> None:
    """Given a noisy champion whose logged metrics come from easy rows and a better candidate
    logged on ordinary rows (its logged metrics lose), when it is promoted, then both are scored
    on the candidate's holdout (rows the champion trained on left out, and counted), it passes,
    and the promotion's audit entry states the evaluation set and both versions' metrics."""
    name = home.training.model_name
    champion_train = pd.concat(
        [rows.train.iloc[:3000], rows.normal.iloc[:500]]
    )  # overlaps the candidate's holdout
    champion, _ = register_trained(home, rows.noisy, champion_train, rows.easy)
    candidate, _ = register_trained(home, rows.good, rows.train, rows.normal)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    assert _logged_verdict(home, name, candidate, champion) is Outcome.FAIL

    result = promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="same rows")
    assert result.gate is not None and result.gate.passed
    evidence = " ".join(result.gate.evidence)
    assert (
        f"holdout of v{candidate} sha256" in evidence
        and f"{len(rows.normal) - 500} rows (500 excluded" in evidence
    )
    assert f"v{candidate}: roc_auc" in evidence and f"champion v{champion}: roc_auc" in evidence
    entry = registry.history(name)[-1]
    assert (
        entry.to_version == candidate
        and "holdout of v2 sha256" in entry.reason
        and "champion v1" in entry.reason
    )


def test_tampered_logged_metrics_cannot_pass_by_claim(home: Settings, rows: World) -> None:
    """Given a noisy candidate whose run's metrics were overwritten through MlflowClient with
    perfect numbers, the gate ignores the claim and refuses it; a version registered with claimed
    metrics and no holdout cannot pass either (ERROR, nothing moves)."""
    name = home.training.model_name
    champion, _ = register_trained(home, rows.good, rows.train, rows.normal)
    candidate, run_id = register_trained(home, rows.noisy, rows.train, rows.normal)
    client = MlflowClient(tracking_uri=home.tracking_uri)
    for metric, value in {"roc_auc": 0.999, "pr_auc": 0.99, "log_loss": 0.001}.items():
        client.log_metric(run_id, metric, value)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    assert registry.version(name, candidate).metrics["roc_auc"] == 0.999
    with pytest.raises(GateFailed, match=r"FAIL: roc_auc 0\.8\d+ vs champion 0\.9\d+"):
        promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="claimed")

    [claimed] = register_versions(home, rows.noisy, [{"roc_auc": 0.999, "pr_auc": 0.99, "log_loss": 0.001}])
    with pytest.raises(GateFailed, match=r"ERROR: v\d+ has no holdout and no evaluation record"):
        promote(home, registry, name=name, alias=CHAMPION, version=claimed, reason="claimed")
    assert registry.aliases(name)[CHAMPION] == champion


def _holdout_file(home: Settings, run_id: str, digest: str) -> Path:
    run = MlflowClient(tracking_uri=home.tracking_uri).get_run(run_id)
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    return root / evaluation.ARTIFACT_DIR / evaluation.holdout_file(digest)


def test_corrupt_or_missing_evaluation_artifact_is_one_line_and_moves_nothing(
    home: Settings, rows: World
) -> None:
    """A holdout whose bytes no longer match the recorded hash, then a deleted one, each give a
    one-line ERROR naming the problem, through the API and `mlops promote` (exit code 6),
    and champion stays where it was."""
    name = home.training.model_name
    champion, _ = register_trained(home, rows.good, rows.train, rows.normal)
    candidate, run_id = register_trained(home, rows.good, rows.train, rows.spare)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    path = _holdout_file(home, run_id, registry.version(name, candidate).tags[evaluation.HOLDOUT_TAG])
    data = path.read_bytes()
    path.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(
        GateFailed, match=r"ERROR: evaluation of v2: holdout of v2 is corrupt: sha256 \w+ != recorded"
    ):
        promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="corrupt")
    path.unlink()
    args = ["--alias", CHAMPION, "--version", str(candidate), "--reason", "missing"]
    result = run_cli(os.environ.copy(), "promote", *args, timeout=300)
    assert result.returncode == 6
    [line] = [x for x in result.stderr.splitlines() if "not promoted" in x]
    assert "ERROR: evaluation of v2: holdout of v2 is missing" in line
    assert registry.aliases(name)[CHAMPION] == champion
    assert [m.to_version for m in registry.history(name) if m.alias == CHAMPION] == [champion]


def test_a_model_whose_inputs_do_not_match_is_an_error(home: Settings, rows: World) -> None:
    """A candidate exported without one of the dataset's features cannot be scored on the
    evaluation rows: a one-line ERROR naming the missing input; nothing moves."""
    from mlops import modeling
    from mlops.settings import LogisticRegressionSpec

    name = home.training.model_name
    schema = home.dataset
    short = schema.model_copy(update={"numeric": schema.numeric[1:]})
    lacking = modeling.to_onnx_bytes(
        modeling.fit(LogisticRegressionSpec(max_iter=200), rows.train, short, 0), short
    )
    champion, _ = register_trained(home, rows.good, rows.train, rows.normal)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    files, tags = evaluation.evidence(rows.train, rows.spare, schema)
    from bench.support import log_onnx_model
    from registry.tracking import log_evaluation_record

    logged = log_onnx_model(home, lacking, "lacking", schema=short, files=files)
    tags |= log_evaluation_record(home, name, logged, tags)
    candidate = registry.register(name, logged.model_uri, logged.run_id, tags, "lacking").version
    gate = champion_gate(home, registry, name, candidate)
    assert gate.outcome is Outcome.ERROR
    assert (
        f"evaluation of v{candidate}: model v{candidate}: ONNX model lacks inputs for features: {schema.numeric[0].name}"
        in gate.reason
    )
    with pytest.raises(GateFailed):
        promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="lacking")
    assert registry.aliases(name)[CHAMPION] == champion


def test_declared_evaluation_data_replaces_the_holdout(
    home: Settings, rows: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With promotion.evaluation_data set, both versions are scored on that file (its hash and
    rows stated); a file lacking a model column is a one-line ERROR."""
    name = home.training.model_name
    champion, _ = register_trained(home, rows.noisy, rows.train, rows.easy)
    candidate, _ = register_trained(home, rows.good, rows.train, rows.easy)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    declared = tmp_path / "holdout.parquet"
    write_parquet([rows.spare], declared)
    monkeypatch.setenv("MLOPS__PROMOTION__EVALUATION_DATA", str(declared))
    settings = load_settings()
    gate = champion_gate(settings, registry, name, candidate)
    assert gate.passed, gate.describe()
    digest = evaluation.sha256(declared.read_bytes())[:12]
    assert f"declared evaluation data {declared} sha256 {digest}, {len(rows.spare)} rows" in gate.evidence[0]

    write_parquet([rows.spare.drop(columns=[home.dataset.label_column])], declared)
    gate = champion_gate(settings, registry, name, candidate)
    assert (
        gate.outcome is Outcome.ERROR and f"lacks model column(s): {home.dataset.label_column}" in gate.reason
    )


def test_tenant_models_are_gated_on_the_same_rows(home: Settings, rows: World) -> None:
    """A tenant's model (``<model>--<tenant>``) goes through the same gate: its noisier
    candidate, flattered by its own easy holdout, is refused on the same rows."""
    name = tenant_model_name(home.training.model_name, "acme")
    champion, _ = register_trained(home, rows.good, rows.train, rows.normal, name=name)
    candidate, _ = register_trained(home, rows.noisy, rows.train, rows.easy, name=name)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    with pytest.raises(GateFailed, match=r"fraud-detector--acme' v2 not promoted .* FAIL: roc_auc"):
        promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="tenant")
    assert registry.aliases(name)[CHAMPION] == champion


def test_a_champion_with_unknown_training_rows_is_compared_and_the_result_says_so(
    home: Settings, rows: World, small_model: bytes
) -> None:
    """A champion registered outside the training flow (no training-row hashes) is still scored
    on the candidate's holdout; the evidence says its overlap with those rows was not checked."""
    name = home.training.model_name
    [champion] = register_versions(home, small_model, [{}])
    candidate, _ = register_trained(home, rows.good, rows.train, rows.normal)
    registry = ModelRegistry(home)
    registry.move_alias(name, CHAMPION, champion, reason="set up")
    gate = champion_gate(home, registry, name, candidate)
    assert gate.outcome is not Outcome.ERROR, gate.describe()
    assert f"v{champion}'s training rows unknown: overlap not checked" in gate.evidence[0]
    assert f"champion v{champion}: roc_auc" in " ".join(gate.evidence)
