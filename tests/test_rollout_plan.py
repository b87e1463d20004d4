"""Rollout plans (mlops.rollout.plan): shipped plans load, bad plans fail naming file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlops.errors import ConfigError
from mlops.rollout.plan import (
    ABStep,
    BanditStep,
    BlueGreenStep,
    CanaryStep,
    MetricCheck,
    RolloutPlan,
    ShadowStep,
    load_plan,
    step_label,
)

REPO = Path(__file__).resolve().parent.parent
PLANS = sorted((REPO / "configs" / "rollout").glob("*.yaml"))

MINIMAL = {
    "name": "t",
    "tick_interval_s": 10,
    "steps": [
        {"kind": "canary", "weights": [10, 50], "checks": [{"metric": "error_rate", "max": 0.01}]},
        {"kind": "blue_green"},
    ],
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _minimum_seconds(plan: RolloutPlan) -> float:
    """The shortest time a plan can take: every duration, each canary weight counted."""
    total = 0.0
    for step in plan.steps:
        weights = len(step.weights) if isinstance(step, CanaryStep) else 1
        span = max(step.duration_s, step.keep_warm_s) if isinstance(step, BlueGreenStep) else step.duration_s
        total += weights * max(span, plan.tick_interval_s)
    return total


@pytest.mark.parametrize("path", PLANS, ids=[p.stem for p in PLANS])
def test_every_shipped_plan_loads(path: Path) -> None:
    """Every plan in configs/rollout validates, ends with the blue-green cutover and has
    an experiment: an A/B step with a pre-registered primary metric, or a bandit step."""
    plan = load_plan(path)
    assert plan.steps[-1].kind == "blue_green"
    assert any(isinstance(s, ABStep | BanditStep) for s in plan.steps)


def test_demo_plan_takes_minutes_and_production_plan_days() -> None:
    """Durations live in the plan: the demo finishes in minutes, production runs for days."""
    demo = load_plan(REPO / "configs/rollout/demo.yaml")
    prod = load_plan(REPO / "configs/rollout/production.yaml")
    assert 60 <= _minimum_seconds(demo) <= 10 * 60
    assert _minimum_seconds(prod) >= 7 * 86400
    demo_canary = next(s for s in demo.steps if isinstance(s, CanaryStep))
    assert demo_canary.weights == (1, 5, 25, 50)
    prod_ab = next(s for s in prod.steps if isinstance(s, ABStep))
    assert prod_ab.primary.min_samples >= 100_000


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    """A typo in a check is refused with the file, the step and the field in one line."""
    bad = yaml.safe_load(yaml.safe_dump(MINIMAL))
    bad["steps"][0]["checks"][0]["treshold"] = 3
    with pytest.raises(ConfigError) as err:
        load_plan(_write(tmp_path, bad))
    msg = str(err.value)
    assert str(tmp_path / "plan.yaml") in msg and "steps.0.canary.checks.0.treshold" in msg
    assert "\n" not in msg


def test_unknown_step_kind_and_metric_are_refused(tmp_path: Path) -> None:
    """Step kinds and metric names are closed sets."""
    bad = yaml.safe_load(yaml.safe_dump(MINIMAL))
    bad["steps"][0]["kind"] = "linear"
    with pytest.raises(ConfigError, match="steps.0"):
        load_plan(_write(tmp_path, bad))
    bad = yaml.safe_load(yaml.safe_dump(MINIMAL))
    bad["steps"][0]["checks"][0]["metric"] = "accuracy_ish"
    with pytest.raises(ConfigError, match="metric"):
        load_plan(_write(tmp_path, bad))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["steps"][0].update(weights=[50, 10]), "must increase"),
        (lambda d: d["steps"][0].update(weights=[0.001]), "two decimals"),
        (lambda d: d["steps"][0].update(weights=[100]), "between 0 and 100"),
        (lambda d: d["steps"].reverse(), "ends with exactly one blue_green"),
        (lambda d: d["steps"][0]["checks"][0].pop("max"), "give min, max or both"),
        (lambda d: d["steps"][0]["checks"][0].update(min=0.5, max=0.1), "min 0.5 > max 0.1"),
        (lambda d: d["steps"][0]["checks"].append({"metric": "error_rate", "max": 0.2}), "used twice"),
        (
            lambda d: d["steps"][1].update(
                checks=[{"metric": "auc", "min": -0.01, "relative_to_stable": "diff"}]
            ),
            "cannot compare with stable",
        ),
        (lambda d: d["steps"].pop(0), "at least one shadow, canary, ab or bandit"),
        (
            lambda d: d["steps"][0]["checks"][0].update(
                metric="agreement", relative_to_stable="ratio", max=1.1
            ),
            "already compares both",
        ),
    ],
)
def test_inconsistent_plans_are_refused(tmp_path: Path, mutate, message: str) -> None:
    """Cross-field rules: increasing ramp, blue-green last, a threshold range per check,
    unique check names, absolute checks after the flip, some traffic step before it."""
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        load_plan(_write(tmp_path, data))


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    """A plan that is absent or not YAML fails as a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="no such config file"):
        load_plan(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_plan(tmp_path / "bad.yaml")


def test_check_keys_and_step_labels() -> None:
    """A check's counters are keyed by its name, by default the metric and comparison;
    steps are labelled by name, else by kind (numbered when a kind repeats)."""
    assert (
        MetricCheck(metric="latency_p99_ms", relative_to_stable="ratio", max=1.5).key
        == "latency_p99_ms_vs_stable_ratio"
    )
    assert MetricCheck(metric="auc", min=0.9, name="auc-floor").key == "auc-floor"
    plan = RolloutPlan(
        name="t",
        tick_interval_s=1,
        steps=(
            ShadowStep(mirror_pct=5),
            ShadowStep(mirror_pct=50),
            CanaryStep(weights=(5,), name="ramp"),
            BlueGreenStep(),
        ),
    )
    assert [step_label(plan, i) for i in range(4)] == ["shadow-1", "shadow-2", "ramp", "blue_green"]


def test_digest_follows_content() -> None:
    """The digest identifies a plan's content: equal plans share it, any change alters it."""
    a = RolloutPlan.model_validate_json(json.dumps(MINIMAL))
    b = RolloutPlan.model_validate_json(json.dumps(MINIMAL))
    c = RolloutPlan.model_validate_json(json.dumps(dict(MINIMAL, tick_interval_s=11)))
    assert a.digest == b.digest != c.digest


BANDIT = {
    "name": "b",
    "tick_interval_s": 5,
    "steps": [
        {
            "kind": "bandit",
            "reward": "gaussian",
            "reward_metric": "neg_log_loss",
            "max_duration_s": 600,
            "checks": [{"metric": "error_rate", "relative_to_stable": "diff", "max": 0.01}],
        },
        {"kind": "blue_green"},
    ],
}


def test_shipped_bandit_plan_has_a_bandit_step_with_guardrails() -> None:
    """configs/rollout/bandit.yaml: a two-arm gaussian bandit on minus log loss, guarded like an A/B."""
    plan = load_plan(REPO / "configs/rollout/bandit.yaml")
    (step,) = [s for s in plan.steps if isinstance(s, BanditStep)]
    assert (step.arms, step.reward, step.reward_metric) == (2, "gaussian", "neg_log_loss")
    assert step.duration_s < step.max_duration_s
    assert {c.metric for c in step.checks} >= {"error_rate", "latency_p99_ms"}
    assert plan.steps.index(step) < len(plan.steps) - 1
    assert [s.kind for s in plan.steps][-2:] == ["approval", "blue_green"]


def test_a_bandit_step_alone_makes_a_plan(tmp_path: Path) -> None:
    """A bandit step is a traffic step: a plan of a bandit and the cutover is valid."""
    plan = load_plan(_write(tmp_path, BANDIT))
    step = plan.steps[0]
    assert isinstance(step, BanditStep)
    assert (step.floor, step.threshold, step.confirm_ticks, step.initial_pct) == (0.05, 0.95, 2, 50.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arms": 3}, "router serves exactly two slots"),
        ({"reward": "bernoulli"}, "reward_metric neg_log_loss is gaussian, not bernoulli"),
        ({"reward_metric": "correct"}, "reward_metric correct is bernoulli, not gaussian"),
        ({"reward_metric": "ctr"}, "reward_metric"),
        ({"duration_s": 700}, "max_duration_s 600 < duration_s 700"),
        ({"floor": 0.5}, "floor"),
        ({"threshold": 0.5}, "threshold"),
        ({"floor": 0.2, "initial_pct": 10}, "outside the floor"),
        ({"max_duration_s": None}, "max_duration_s"),
        ({"min_sample": 10}, "min_sample"),
    ],
)
def test_bad_bandit_steps_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    """The bandit step is strict: two arms, a reward model that fits its metric, a maximum
    duration past the minimum, a floor and initial weight that fit, no unknown field."""
    data = yaml.safe_load(yaml.safe_dump(BANDIT))
    data["steps"][0].update(change)
    if change.get("max_duration_s", 0) is None:
        data["steps"][0].pop("max_duration_s")
    with pytest.raises(ConfigError, match=message):
        load_plan(_write(tmp_path, data))
