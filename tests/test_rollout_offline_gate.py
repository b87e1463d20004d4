"""A rollout ends by promoting, so it answers to the registry's offline promotion gate.

Under a plan with ``offline_gate: enforce`` (the default) a candidate whose offline metrics
fail the promotion gate against the champion's starts no rollout: nothing is persisted, no
traffic moves, no alias moves. ``advisory`` logs the verdict and lets the live gates decide.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mlops.errors import GateFailed
from mlops.gates import CheckResult, GateResult, Outcome
from mlops.rollout.plan import load_plan
from mlops.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CHAMPION_METRICS = {"roc_auc": 0.91, "pr_auc": 0.25, "log_loss": 0.045}


def _plan(tmp_path: Path, mode: str | None):
    text = (REPO / "tests/plans/fast-rollout.yaml").read_text()
    if mode is not None:
        text = text.replace("tick_interval_s: 1\n", f"tick_interval_s: 1\noffline_gate: {mode}\n")
    path = tmp_path / f"plan-{mode}.yaml"
    path.write_text(text)
    return path, load_plan(path)


FAILED = GateResult((CheckResult("pr_auc", Outcome.FAIL, "pr_auc 0.2400 vs champion 0.2500"),))
PASSED = GateResult((CheckResult("pr_auc", Outcome.PASS, "pr_auc 0.2600 vs champion 0.2500"),))


def test_plans_enforce_the_offline_gate_unless_they_say_advisory(tmp_path: Path) -> None:
    """A plan that says nothing enforces the gate; every shipped plan does too."""
    _, default = _plan(tmp_path, None)
    assert default.offline_gate == "enforce"
    shipped = sorted((REPO / "configs/rollout").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"demo", "demo-live", "production"}
    for path in shipped:
        assert load_plan(path).offline_gate == "enforce", path
    _, advisory = _plan(tmp_path, "advisory")
    assert advisory.offline_gate == "advisory"


def test_rollouts_persisted_before_the_field_existed_resume_under_their_plan(tmp_path: Path) -> None:
    """A plan.json written before plans had offline_gate reads back with the same digest its
    rollout recorded; an advisory plan hashes differently from the enforcing one."""
    import json

    from mlops.rollout.plan import RolloutPlan

    _, plan = _plan(tmp_path, None)
    old = json.loads(plan.model_dump_json())
    del old["offline_gate"]
    before = hashlib.blake2b(json.dumps(old, separators=(",", ":")).encode(), digest_size=8).hexdigest()
    assert RolloutPlan.model_validate_json(json.dumps(old)).digest == before
    _, advisory = _plan(tmp_path, "advisory")
    assert advisory.digest != plan.digest


def test_an_enforced_gate_refuses_a_failing_candidate_and_an_advisory_one_says_why_it_goes_on(
    tmp_path: Path,
) -> None:
    """Enforced, a FAIL raises GateFailed naming the failed check and the plan; advisory, the
    verdict comes back as the line to log; a PASS passes either way."""
    from flows.rollout import check_offline_gate

    _, enforce = _plan(tmp_path, "enforce")
    _, advisory = _plan(tmp_path, "advisory")
    with pytest.raises(GateFailed, match=r"v2 against champion v1: FAIL: pr_auc 0.2400 .*enforces it"):
        check_offline_gate(enforce, FAILED, 2, 1)
    assert "advisory under plan" in check_offline_gate(advisory, FAILED, 2, 1)
    assert "PASS" in check_offline_gate(enforce, PASSED, 2, 1)


@pytest.mark.slow
def test_a_rollout_of_a_candidate_failing_the_offline_gate_starts_nothing(
    home: Settings, small_model: bytes, prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given champion v1 and a challenger v2 whose pr_auc regresses past the gate's limit in
    a real MLflow registry, when a rollout of v2 is started under an enforcing plan, then it
    fails with GateFailed before anything happens: no rollout is persisted and the aliases
    are as they were (no serving is needed to find that out). `mlops rollout` says so in
    one line and exits 6."""
    from conftest import register_versions

    from flows.rollout import rollout_flow
    from registry.mlflow_registry import ModelRegistry

    monkeypatch.setenv("MLOPS__PROMOTION__TRUST_LOGGED_METRICS", "true")  # fixture versions have no holdout
    v1, v2 = register_versions(home, small_model, [CHAMPION_METRICS, CHAMPION_METRICS | {"pr_auc": 0.22}])
    registry = ModelRegistry(home)
    name = home.training.model_name
    registry.move_alias(name, "champion", v1, reason="test")
    before = registry.aliases(name)
    assert before["challenger"] == v2
    plan, _ = _plan(tmp_path, None)
    with pytest.raises(GateFailed, match=r"pr_auc 0.2200 vs champion 0.2500 \(regression 0.0300"):
        rollout_flow(plan=str(plan), candidate="challenger", approval="approve")
    assert not (home.home_path / "rollouts").exists() or not any((home.home_path / "rollouts").iterdir())
    assert registry.aliases(name) == before

    from typer.testing import CliRunner

    from mlops_cli.main import app

    result = CliRunner().invoke(app, ["rollout", "--plan", str(plan), "--auto-answer", "approve"])
    assert result.exit_code == 6, result.output
    assert "error: offline promotion gate of v2 against champion v1: FAIL" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert registry.aliases(name) == before
