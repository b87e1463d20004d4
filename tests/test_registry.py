"""The registry adapter against real MLflow on SQLite: aliases, compare-and-set, audit history."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlops.errors import GateFailed, NotFound, StaleAlias
from mlops.registry_model import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    model_uri,
    parse_expect,
    plan_promotion,
)
from mlops.settings import Settings
from registry.mlflow_registry import ModelRegistry
from registry.promotion import promote
from tests.conftest import register_versions
from tests.support.cli import run_cli

GOOD = {"roc_auc": 0.90, "pr_auc": 0.30, "log_loss": 0.05}
pytestmark = pytest.mark.integration


@pytest.fixture
def trusting(home: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``home`` gating fixture versions (registered without a holdout) on their logged metrics."""
    from mlops.settings import load_settings

    monkeypatch.setenv("MLOPS__PROMOTION__TRUST_LOGGED_METRICS", "true")
    return load_settings()


def test_uri_helpers_and_expectations() -> None:
    """Models are addressed by alias or version; CLI expectations parse to ANY, unset or a version."""
    assert model_uri("fraud", alias="champion") == "models:/fraud@champion"
    assert model_uri("fraud", version=3) == "models:/fraud/3"
    assert repr(parse_expect(None)) == "ANY" and parse_expect("none") is None and parse_expect("4") == 4
    with pytest.raises(ValueError, match="version number"):
        parse_expect("latest")


def test_promotion_plan_keeps_previous_champion() -> None:
    """Promoting a new champion first parks the outgoing one as previous-champion."""
    assert plan_promotion(CHAMPION, 3, {CHAMPION: 2, PREVIOUS_CHAMPION: 1}) == [
        (PREVIOUS_CHAMPION, 1, 2),
        (CHAMPION, 2, 3),
    ]
    assert plan_promotion(CHAMPION, 1, {}) == [(CHAMPION, None, 1)]
    assert plan_promotion(CHAMPION, 2, {CHAMPION: 2}) == []


def test_register_points_challenger_at_each_new_version(home: Settings, small_model: bytes) -> None:
    """Each registered version becomes challenger; the history records both moves."""
    v1, v2 = register_versions(home, small_model, [GOOD, GOOD])
    registry = ModelRegistry(home)
    name = home.training.model_name
    assert registry.resolve(name, CHALLENGER).version == v2
    moves = registry.history(name)
    assert [(m.alias, m.from_version, m.to_version, m.action) for m in moves] == [
        (CHALLENGER, None, v1, "register"),
        (CHALLENGER, v1, v2, "register"),
    ]
    assert registry.onnx_bytes(name, v1) == small_model


def test_stale_expect_current_moves_nothing(trusting: Settings, small_model: bytes) -> None:
    """A promotion whose --expect-current is stale fails and leaves every alias where it was."""
    v1, v2, v3 = register_versions(trusting, small_model, [GOOD, GOOD, GOOD])
    registry = ModelRegistry(trusting)
    name = trusting.training.model_name
    promote(trusting, registry, name=name, alias=CHAMPION, version=v1, reason="first", expect_current=None)
    promote(trusting, registry, name=name, alias=CHAMPION, version=v2, reason="better", expect_current=v1)
    before, history_before = registry.aliases(name), registry.history(name)
    with pytest.raises(StaleAlias, match=r"'fraud-detector@champion' is v2, expected v1; nothing was moved"):
        promote(trusting, registry, name=name, alias=CHAMPION, version=v3, reason="late", expect_current=v1)
    assert registry.aliases(name) == before == {CHALLENGER: v3, CHAMPION: v2, PREVIOUS_CHAMPION: v1}
    assert registry.history(name) == history_before


def test_gate_refuses_a_worse_candidate(trusting: Settings, small_model: bytes) -> None:
    """With promotion.trust_logged_metrics, versions registered without a holdout are gated on
    their logged metrics and the verdict says so: a candidate that regresses beyond the margin is
    refused with the reason; nothing moves."""
    v1, v2 = register_versions(trusting, small_model, [GOOD, GOOD | {"roc_auc": 0.85}])
    registry = ModelRegistry(trusting)
    name = trusting.training.model_name
    promote(trusting, registry, name=name, alias=CHAMPION, version=v1, reason="first")
    with pytest.raises(GateFailed, match=r"roc_auc 0\.8500 vs champion 0\.9000.*logged metrics as claimed"):
        promote(trusting, registry, name=name, alias=CHAMPION, version=v2, reason="worse")
    assert registry.aliases(name)[CHAMPION] == v1


def test_unknown_version_moves_nothing(home: Settings, small_model: bytes) -> None:
    """Promoting a version that does not exist fails before any alias moves."""
    (v1,) = register_versions(home, small_model, [GOOD])
    registry = ModelRegistry(home)
    name = home.training.model_name
    with pytest.raises(NotFound, match="has no version 42"):
        promote(home, registry, name=name, alias=CHAMPION, version=42, reason="typo", skip_gate=True)
    assert registry.aliases(name) == {CHALLENGER: v1}


def test_moves_made_outside_the_platform_are_recorded(trusting: Settings, small_model: bytes) -> None:
    """An alias changed directly in MLflow shows up in the history as an external move."""
    v1, v2 = register_versions(trusting, small_model, [GOOD, GOOD])
    registry = ModelRegistry(trusting)
    name = trusting.training.model_name
    registry.client.set_registered_model_alias(name, CHAMPION, str(v1))
    promote(trusting, registry, name=name, alias=CHAMPION, version=v2, reason="after manual move")
    moves = [(m.alias, m.from_version, m.to_version, m.action) for m in registry.history(name)]
    assert (CHAMPION, None, v1, "external") in moves
    assert moves[-2:] == [(PREVIOUS_CHAMPION, None, v1, "promote"), (CHAMPION, v1, v2, "promote")]


@pytest.mark.slow
def test_concurrent_promotions_in_processes_have_one_winner(trusting: Settings, small_model: bytes) -> None:
    """Eight processes promote different versions over the same champion: exactly one wins, history stays consistent."""
    versions = register_versions(trusting, small_model, [GOOD] * 9)
    registry = ModelRegistry(trusting)
    name = trusting.training.model_name
    promote(
        trusting, registry, name=name, alias=CHAMPION, version=versions[0], reason="base", expect_current=None
    )
    contenders = versions[1:]

    def run(version: int) -> subprocess.CompletedProcess[str]:
        args = ["--alias", CHAMPION, "--version", str(version), "--expect-current", str(versions[0])]
        return run_cli(os.environ.copy(), "promote", *args, "--reason", f"race {version}", timeout=300)

    with ThreadPoolExecutor(len(contenders)) as pool:
        results = dict(zip(contenders, pool.map(run, contenders), strict=True))
    winners = [v for v, r in results.items() if r.returncode == 0]
    assert len(winners) == 1, {v: (r.returncode, r.stderr[-300:]) for v, r in results.items()}
    for v, r in results.items():
        if v not in winners:
            assert r.returncode != 0 and f"expected v{versions[0]}; nothing was moved" in r.stderr
    winner = winners[0]
    assert registry.aliases(name)[CHAMPION] == winner
    assert registry.aliases(name)[PREVIOUS_CHAMPION] == versions[0]
    champion_moves = [m for m in registry.history(name) if m.alias == CHAMPION]
    assert [(m.from_version, m.to_version) for m in champion_moves] == [
        (None, versions[0]),
        (versions[0], winner),
    ]
