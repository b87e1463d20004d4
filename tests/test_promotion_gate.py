"""The promotion gate scores champion and candidate on the same rows, with real MLflow and ONNX Runtime."""

from __future__ import annotations

import json
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


def _log_outside_flow(
    home: Settings, onnx_model: bytes, files: dict[str, bytes], tags: dict[str, str]
) -> int:
    """Log a run and register it as a tracking-server writer could, without the training flow."""
    from bench.support import log_onnx_model

    logged = log_onnx_model(home, onnx_model, "outside-the-flow", files=files)
    return (
        ModelRegistry(home)
        .register(home.training.model_name, logged.model_uri, logged.run_id, tags, "forged")
        .version
    )


def test_a_forged_holdout_with_matching_hashes_but_no_signed_record_moves_nothing(
    home: Settings, rows: World
) -> None:
    """Given a tracking writer who logs a noisy model with a cherry-picked (easy) holdout and
    correct SHA-256 tags but no signed evaluation record, and points challenger at it, when it is
    promoted, then the gate is an ERROR naming the unsigned holdout (`mlops promote` exits 6) and
    champion stays."""
    name = home.training.model_name
    champion, _ = register_trained(home, rows.good, rows.train, rows.normal)
    registry = ModelRegistry(home)
    promote(home, registry, name=name, alias=CHAMPION, version=champion, reason="first")
    files, tags = evaluation.evidence(rows.train, rows.easy, home.dataset)
    forged = _log_outside_flow(home, rows.noisy, files, tags)
    assert registry.aliases(name)[CHALLENGER] == forged
    with pytest.raises(
        GateFailed, match=rf"ERROR: holdout of v{forged} is not signed by a trusted training key"
    ):
        promote(home, registry, name=name, alias=CHAMPION, version=forged, reason="forged")
    args = ["--alias", CHAMPION, "--version", str(forged), "--reason", "forged"]
    cli = run_cli(os.environ.copy(), "promote", *args, timeout=300)
    [line] = [x for x in cli.stderr.splitlines() if "not promoted" in x]
    assert cli.returncode == 6 and f"holdout of v{forged} is not signed by a trusted training key" in line
    assert registry.aliases(name)[CHAMPION] == champion


def test_a_record_signed_by_an_untrusted_key_is_refused_until_that_key_is_trusted(
    home: Settings, rows: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a version whose record a worker signed with its own key file
    (promotion.evaluation_signing_key), a gate that does not trust that key is an ERROR naming
    the untrusted key; once its public key is in promotion.trusted_evaluation_keys the same
    version is evaluated on its holdout and passes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from mlops.edge.manifest import public_bytes

    name = home.training.model_name
    worker_key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "worker.pem"
    key_file.write_bytes(worker_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    worker = home.model_copy(
        update={"promotion": home.promotion.model_copy(update={"evaluation_signing_key": str(key_file)})}
    )
    candidate, _ = register_trained(worker, rows.good, rows.train, rows.normal)
    registry = ModelRegistry(home)
    gate = champion_gate(home, registry, name, candidate)
    assert gate.outcome is Outcome.ERROR
    assert (
        f"holdout of v{candidate} is not signed by a trusted training key (signed by untrusted key"
        in gate.reason
    )
    with pytest.raises(GateFailed):
        promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="untrusted")
    assert CHAMPION not in registry.aliases(name)

    monkeypatch.setenv(
        "MLOPS__PROMOTION__TRUSTED_EVALUATION_KEYS", json.dumps([public_bytes(worker_key.public_key()).hex()])
    )
    trusting = load_settings()
    result = promote(trusting, registry, name=name, alias=CHAMPION, version=candidate, reason="trusted")
    assert (
        result.gate is not None
        and result.gate.passed
        and f"holdout of v{candidate} sha256" in result.gate.evidence[0]
    )


def test_a_valid_record_replayed_on_another_run_is_refused(home: Settings, rows: World) -> None:
    """Given v1's genuine signed record, holdout and training rows copied into another run that
    registers a noisy model, the gate is an ERROR naming the record's run and the version's run."""
    name = home.training.model_name
    honest, honest_run = register_trained(home, rows.good, rows.train, rows.easy)
    registry = ModelRegistry(home)
    tags = {k: v for k, v in registry.version(name, honest).tags.items() if k.startswith("lineage.")}
    files = {
        f: registry.run_artifact(honest_run, f"{evaluation.ARTIFACT_DIR}/{f}")
        for f in (
            evaluation.holdout_file(tags[evaluation.HOLDOUT_TAG]),
            evaluation.train_rows_file(tags[evaluation.TRAIN_ROWS_TAG]),
            evaluation.record_file(tags[evaluation.RECORD_TAG]),
        )
    }
    replayed = _log_outside_flow(home, rows.noisy, files, tags)
    replayed_run = registry.version(name, replayed).run_id
    gate = champion_gate(home, registry, name, replayed)
    assert gate.outcome is Outcome.ERROR
    assert (
        f"evaluation record of v{replayed} names run {honest_run}, the version's run is {replayed_run}"
        in gate.reason
    )
    with pytest.raises(GateFailed):
        promote(home, registry, name=name, alias=CHAMPION, version=replayed, reason="replayed")
    assert CHAMPION not in registry.aliases(name)


def test_a_model_swapped_after_signing_is_refused(home: Settings, rows: World) -> None:
    """Given a signed version whose stored ONNX file is overwritten with a noisy model, the gate
    is an ERROR saying the model is not the one its record was signed for; nothing moves."""
    name = home.training.model_name
    candidate, _ = register_trained(home, rows.good, rows.train, rows.normal)
    registry = ModelRegistry(home)
    client = MlflowClient(tracking_uri=home.tracking_uri)
    source = registry.version(name, candidate).source
    folder = Path(
        client.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://")
    )
    [onnx_file] = folder.rglob("*.onnx")
    onnx_file.write_bytes(rows.noisy)
    gate = champion_gate(home, registry, name, candidate)
    assert gate.outcome is Outcome.ERROR
    assert f"model of v{candidate} is not the model its evaluation record was signed for" in gate.reason
    assert "\n" not in gate.describe()
    with pytest.raises(GateFailed):
        promote(home, registry, name=name, alias=CHAMPION, version=candidate, reason="swapped")
    assert CHAMPION not in registry.aliases(name)


def test_a_champions_unsigned_training_rows_do_not_shape_the_evaluation_set(
    home: Settings, rows: World
) -> None:
    """Given a champion logged outside the flow whose (unsigned) training-row list names half the
    candidate's holdout, the list is not used: no row is excluded and the result says the
    champion's overlap was not checked because its list is not signed."""
    name = home.training.model_name
    files, tags = evaluation.evidence(rows.normal.iloc[:1000], rows.spare, home.dataset)
    champion = _log_outside_flow(home, rows.good, files, tags)
    candidate, _ = register_trained(home, rows.good, rows.train, rows.normal)
    registry = ModelRegistry(home)
    registry.move_alias(name, CHAMPION, champion, reason="set up")
    gate = champion_gate(home, registry, name, candidate)
    assert gate.outcome is not Outcome.ERROR, gate.describe()
    assert f"{len(rows.normal)} rows;" in gate.evidence[0] and "excluded" not in gate.evidence[0]
    assert (
        f"v{champion}'s training rows unknown: overlap not checked (training-row list of v{champion} is not signed"
        in gate.evidence[0]
    )
