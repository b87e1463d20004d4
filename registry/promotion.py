"""Promotion: the gate between challenger and champion, applied through the audited CAS."""

from __future__ import annotations

from dataclasses import dataclass

from mlops.errors import GateFailed
from mlops.gates import GateResult, promotion_gate
from mlops.registry_model import ANY, CHAMPION, AliasMove, ExpectCurrent
from mlops.settings import Settings
from registry.mlflow_registry import ModelRegistry


@dataclass(frozen=True)
class PromotionResult:
    """A completed alias move: the gate that allowed it (None when no gate applied) and the audited moves."""

    model: str
    alias: str
    version: int
    gate: GateResult | None
    moves: tuple[AliasMove, ...]


def champion_gate(settings: Settings, registry: ModelRegistry, name: str, version: int) -> GateResult:
    """Check a version's metrics against absolute bounds and the current champion."""
    candidate = registry.version(name, version)
    champion_version = registry.aliases(name).get(CHAMPION)
    champion = None
    if champion_version is not None and champion_version != version:
        champion = registry.version(name, champion_version).metrics
    return promotion_gate(settings.promotion.gates, candidate.metrics, champion)


def promote(
    settings: Settings,
    registry: ModelRegistry,
    *,
    name: str,
    alias: str,
    version: int,
    reason: str,
    expect_current: ExpectCurrent = ANY,
    skip_gate: bool = False,
    run_id: str | None = None,
) -> PromotionResult:
    """Move ``alias`` to ``version``; a move to ``champion`` must pass the promotion gate.

    Raises ``GateFailed`` (nothing moved) when the gate does not pass, ``StaleAlias`` when
    ``expect_current`` no longer holds.
    """
    gate = None
    if alias == CHAMPION and not skip_gate:
        gate = champion_gate(settings, registry, name, version)
        if not gate.passed:
            raise GateFailed(
                f"'{name}' v{version} not promoted to {alias}: {gate.outcome.value}: {gate.reason}"
            )
    action = "promote" if not skip_gate else "promote-ungated"
    moves = registry.move_alias(
        name, alias, version, reason=reason, expect_current=expect_current, action=action, run_id=run_id
    )
    return PromotionResult(name, alias, version, gate, tuple(moves))
