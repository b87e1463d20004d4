"""Rollout plans: the ordered steps a candidate goes through, and the gates of each step.

A plan is configuration (``configs/rollout/*.yaml``) validated once into frozen strict
models: an unknown field, a wrong type or an inconsistent plan is a ``ConfigError`` naming
the file and the field. Steps are a discriminated union on ``kind`` (``replay``,
``shadow``, ``canary``, ``ab``, ``bandit``, ``approval``, ``blue_green``, then optionally
``devices``); each check carries the
limits it is counted against (``GateLimits``). What each step does and how checks are
counted: docs/design/rollout-model.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlops.settings import StrictModel, read_yaml, require_unique, validate_model

# --------------------------------------------------------------------------- metrics

SampleKind = Literal["requests", "labelled", "pairs"]

METRICS: dict[str, tuple[SampleKind, str]] = {
    # system, per variant, from every answer in the window
    "latency_p50_ms": ("requests", "median latency of the variant's answers, ms"),
    "latency_p95_ms": ("requests", "95th percentile latency, ms"),
    "latency_p99_ms": ("requests", "99th percentile latency, ms"),
    "error_rate": ("requests", "share of answers whose model call failed"),
    "decision_rate": ("requests", "share of successful answers whose decision is positive"),
    # model quality, on answers whose label has arrived
    "auc": ("labelled", "ROC AUC of the scores against the labels"),
    "log_loss": ("labelled", "mean log loss of the scores against the labels"),
    "calibration_error": ("labelled", "expected calibration error, 10 equal-frequency bins"),
    # drift against the training reference
    "score_psi": ("requests", "PSI of the variant's scores against its reference scores"),
    "score_ks": ("requests", "KS statistic of the scores against the reference scores"),
    "input_psi": ("requests", "largest PSI of any input feature against the training data"),
    "input_ks": ("requests", "largest KS statistic of any numeric input feature"),
    # agreement of paired answers (shadow mirror online, replay offline)
    "agreement": ("pairs", "share of paired requests on which both models decide alike"),
    "score_correlation": ("pairs", "Pearson correlation of the paired scores"),
}
"""Every metric a check may name: how its samples are counted, and what it measures."""

Metric = Literal[
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "error_rate",
    "decision_rate",
    "auc",
    "log_loss",
    "calibration_error",
    "score_psi",
    "score_ks",
    "input_psi",
    "input_ks",
    "agreement",
    "score_correlation",
]
PAIRED_METRICS = frozenset({"agreement", "score_correlation"})
DRIFT_METRICS = frozenset({"score_psi", "score_ks", "input_psi", "input_ks"})

OnFail = Literal["rollback", "pause", "abort"]
"""What a tripped check does: ``rollback`` (all traffic to stable now, the candidate is
judged worse), ``abort`` (all traffic to stable now, no verdict on the candidate: the
experiment itself is invalid) or ``pause`` (traffic stays as it is, the rollout waits for an
operator to resume, roll back or abort)."""


class GateLimits(StrictModel):
    """How one check's measurements are counted, and what happens when it trips."""

    min_samples: int = Field(100, ge=1)
    failure_limit: int = Field(0, ge=0)
    inconclusive_limit: int = Field(0, ge=0)
    error_limit: int = Field(2, ge=0)
    dry_run: bool = False
    on_fail: OnFail = "rollback"
    on_inconclusive: OnFail = "abort"


class MetricCheck(GateLimits):
    """One metric of the candidate, measured every tick against a threshold range.

    ``relative_to_stable`` compares the candidate with ``stable`` over the same window:
    ``ratio`` checks ``candidate / stable`` and ``diff`` checks ``candidate - stable``
    against ``min``/``max``; without it the candidate's own value is checked. Both sides
    then need ``min_samples``. ``name`` (default: the metric, suffixed by the comparison)
    identifies the check's counters and must be unique within a step.

    ``min_positives`` (label-based metrics only) also asks for that many positive *and*
    negative labels on each side before the check may conclude: with fraud at ~1 %, 500
    labelled answers hold about 5 frauds, and an AUC over 5 positives is noise.
    """

    metric: Metric
    name: str | None = Field(None, min_length=1)
    min: float | None = None
    max: float | None = None
    relative_to_stable: Literal["ratio", "diff"] | None = None
    min_positives: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> MetricCheck:
        if self.min is None and self.max is None:
            raise ValueError(f"check {self.key}: give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"check {self.key}: min {self.min} > max {self.max}")
        if self.relative_to_stable and self.metric in PAIRED_METRICS:
            raise ValueError(f"check {self.key}: {self.metric} already compares both models")
        if self.min_positives and METRICS[self.metric][0] != "labelled":
            raise ValueError(f"check {self.key}: min_positives applies to label-based metrics only")
        return self

    @property
    def key(self) -> str:
        """The check's name: ``name``, else the metric with its comparison."""
        if self.name:
            return self.name
        suffix = f"_vs_stable_{self.relative_to_stable}" if self.relative_to_stable else ""
        return self.metric + suffix

    @property
    def samples(self) -> SampleKind:
        """What the metric's samples are (requests, labelled answers or pairs)."""
        return METRICS[self.metric][0]


class SequentialTest(GateLimits):
    """The A/B step's pre-registered primary metric, tested with a mixture SPRT.

    ``metric`` is a per-request value (``log_loss``, ``brier``: lower is better, need the
    label; ``accuracy``: share of correct decisions, higher is better; ``latency_ms``: lower
    is better). The effect is measured so that positive means the candidate is better.
    ``mde`` is the minimum detectable effect in the metric's unit; ``sigma`` the
    pre-registered per-request standard deviation (estimated from ``stable`` when absent);
    ``tau`` the mixing scale of the test (default ``mde``). The test may conclude a winner
    (``superiority``) or "not worse by more than ``mde``" (``non_inferiority``) only once
    both arms hold the sample size that gives ``power`` at ``mde``; a candidate that is
    significantly worse fails as soon as it is (the test is valid at every look).
    ``min_samples`` is per arm.
    """

    metric: Literal["log_loss", "brier", "accuracy", "latency_ms"] = "log_loss"
    hypothesis: Literal["superiority", "non_inferiority"] = "superiority"
    alpha: float = Field(0.05, gt=0, lt=0.5)
    power: float = Field(0.8, gt=0.5, lt=1)
    mde: float = Field(gt=0)
    sigma: float | None = Field(None, gt=0)
    tau: float | None = Field(None, gt=0)
    min_samples: int = Field(1000, ge=2)

    @property
    def key(self) -> str:
        """The name the primary test is counted and reported under."""
        return f"ab_{self.metric}"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of the metric is better."""
        return self.metric == "accuracy"


class SrmCheck(GateLimits):
    """Sample-ratio mismatch: the arms' entity counts against the configured split.

    A sequential test of distinct entities (users) per arm; the split is by entity, so
    entity counts are binomial whatever each user's request rate. Its p-value is valid at
    every tick: an honest split fails at some tick of a step with probability at most
    ``alpha``. ``p < alpha`` FAILs; the default action is ``abort``, since a broken split makes
    the experiment, not the candidate, untrustworthy. ``prior_strength`` is the weight of the
    test's Dirichlet prior (in entities): larger detects small mismatches over many entities
    sooner, smaller detects large mismatches over few entities sooner.
    """

    alpha: float = Field(0.001, gt=0, lt=0.5)
    prior_strength: float = Field(100.0, gt=0)
    on_fail: OnFail = "abort"

    @property
    def key(self) -> str:
        """The name the sample-ratio check is counted and reported under."""
        return "sample_ratio"


# --------------------------------------------------------------------------- steps


class _Step(StrictModel):
    """Fields every step has: a display name, its checks and its minimum duration."""

    name: str | None = Field(None, min_length=1)
    checks: tuple[MetricCheck, ...] = ()
    duration_s: float = Field(0.0, ge=0)

    @property
    def needs_reference(self) -> bool:
        """Whether a check of this step compares traffic with the training reference
        (observing without references is cheaper when none does)."""
        return any(c.metric in DRIFT_METRICS for c in self.checks)

    @model_validator(mode="after")
    def _unique_check_names(self) -> _Step:
        keys = [c.key for c in self.checks]
        require_unique(keys, "check names", " in one step", " (set `name`)")
        return self


class ReplayStep(_Step):
    """Offline comparison: both models score the same labelled rows; no traffic moves."""

    kind: Literal["replay"] = "replay"


class ShadowStep(_Step):
    """``mirror_pct`` of requests are also answered by the candidate, off the response path.

    The step completes when ``duration_s`` has passed, every check passes and the candidate
    has answered at least ``min_samples`` mirrored requests.
    """

    kind: Literal["shadow"] = "shadow"
    mirror_pct: float = Field(gt=0, le=100)
    min_samples: int = Field(100, ge=1)


class CanaryStep(_Step):
    """A ramp of sticky weights; each weight is analysed for ``duration_s`` before the next.

    A weight completes only when the candidate answered at least ``min_samples`` requests
    at it, so a canary that receives no traffic never advances.
    """

    kind: Literal["canary"] = "canary"
    weights: tuple[float, ...] = Field(min_length=1)
    min_samples: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _ramp(self) -> CanaryStep:
        if any(not 0 < w < 100 for w in self.weights):
            raise ValueError("canary weights must be between 0 and 100 (exclusive)")
        if any(b <= a for a, b in zip(self.weights, self.weights[1:], strict=False)):
            raise ValueError("canary weights must increase")
        if any(round(w * 100) != w * 100 for w in self.weights):
            raise ValueError("canary weights have at most two decimals (0.01 % steps)")
        return self


class ABStep(_Step):
    """A sticky ``candidate_pct`` split with a sequential test of ``primary``.

    ``checks`` are the guardrails (measured every tick like any check). The step completes
    when ``duration_s`` has passed, the primary test PASSes, guardrails and the SRM check
    pass, and the candidate answered at least ``min_samples`` requests.
    """

    kind: Literal["ab"] = "ab"
    candidate_pct: float = Field(50.0, gt=0, lt=100)
    min_samples: int = Field(100, ge=1)
    primary: SequentialTest
    srm: SrmCheck = SrmCheck()


class ApprovalStep(_Step):
    """A human approves the version under test; traffic stays as the previous step left it.

    No answer within ``timeout_s`` ends the rollout in ``TIMED_OUT``, which promotes
    nothing. ``checks`` keep guarding the live traffic while the approval is pending.
    """

    kind: Literal["approval"] = "approval"
    timeout_s: float = Field(gt=0)


class BlueGreenStep(_Step):
    """The cutover, always the plan's last step.

    On entry the ``champion`` alias moves to the candidate (the old champion becomes
    ``previous-champion``) and all traffic flips to the candidate slot while the old
    champion stays loaded. ``checks`` are the post-promotion analysis over ``duration_s``:
    a trip flips traffic and aliases back at once. After ``keep_warm_s`` (and a passing
    analysis) the old slot is released. No stable traffic exists after the flip, so checks
    here are absolute (``relative_to_stable`` is refused).
    """

    kind: Literal["blue_green"] = "blue_green"
    keep_warm_s: float = Field(0.0, ge=0)
    min_samples: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _absolute_only(self) -> BlueGreenStep:
        rel = [c.key for c in self.checks if c.relative_to_stable or c.metric in PAIRED_METRICS]
        if rel:
            raise ValueError(
                f"blue_green checks cannot compare with stable (no stable traffic after the flip): {', '.join(rel)}"
            )
        return self


class DeviceStep(_Step):
    """After the cutover, the promoted model goes on to the edge fleet, in the same rollout.

    On entry the promoted version is compressed for the device ``budget`` (the edge export:
    ``configs/edge/*.yaml``; ``variant`` names a passing variant, default: the export's
    selection) and published as the next signed release; the release is then served to
    widening cohorts (``stages``, percent of the fleet) of ``devices`` devices of ``fleet``,
    each stage gated on device telemetry by the OTA machine (``mlops.edge.ota``) with
    ``failure_limit`` / ``inconclusive_limit``. The last stage passing marks the release
    good and the rollout succeeds. A failing stage halts the fleet (restoring the last good
    release where there is one); ``on_device_failure: rollback_server`` also rolls the
    server back (champion alias back by compare-and-set, traffic back to the old slot,
    which stays warm until the devices are done). ``checks`` keep guarding the server's
    live traffic (absolute, as after the flip).
    """

    kind: Literal["devices"] = "devices"
    budget: str = Field(min_length=1)
    variant: str | None = Field(None, min_length=1)
    stages: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
    devices: int = Field(1000, ge=1)
    fleet: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    failure_limit: int = Field(0, ge=0)
    inconclusive_limit: int = Field(2, ge=0)
    on_device_failure: Literal["halt_fleet", "rollback_server"] = "halt_fleet"

    @model_validator(mode="after")
    def _device_shape(self) -> DeviceStep:
        st = self.stages
        if not st or any(b <= a for a, b in zip(st, st[1:], strict=False)) or st[0] <= 0 or st[-1] != 100.0:
            raise ValueError("stages must be increasing percentages above 0 that end at 100")
        rel = [c.key for c in self.checks if c.relative_to_stable or c.metric in PAIRED_METRICS]
        if rel:
            raise ValueError(f"devices checks cannot compare with stable (after the flip): {', '.join(rel)}")
        return self


RewardMetric = Literal["correct", "neg_log_loss", "neg_brier"]
REWARD_KINDS: dict[str, str] = {"correct": "bernoulli", "neg_log_loss": "gaussian", "neg_brier": "gaussian"}
"""Each reward's model: ``correct`` (the decision matched the label) is 0/1, the others are
continuous (minus each labelled answer's log loss or Brier score: higher is better)."""


class BanditStep(_Step):
    """Thompson-sampling allocation between stable and the candidate, read as an experiment.

    Every tick the arms' rewards over the step's window (one per labelled primary answer:
    ``reward_metric``) update each arm's posterior; the candidate's sticky weight follows its
    P(best), never below ``floor`` for either arm. An arm wins when both arms hold
    ``min_samples`` rewards, its P(best) >= ``threshold`` and its expected loss <=
    ``max_expected_loss``, on ``confirm_ticks`` consecutive ticks. The candidate winning
    (after ``duration_s`` and with every guardrail ``check`` passing) completes the step;
    stable winning, or no winner within ``max_duration_s``, rolls back.

    ``arms`` is 2: the router serves two slots (stable and candidate) today.
    """

    kind: Literal["bandit"] = "bandit"
    arms: int = 2
    reward: Literal["bernoulli", "gaussian"] = "bernoulli"
    reward_metric: RewardMetric = "correct"
    initial_pct: float = Field(50.0, gt=0, lt=100)
    floor: float = Field(0.05, gt=0, lt=0.5)
    threshold: float = Field(0.95, gt=0.5, lt=1)
    max_expected_loss: float = Field(0.001, ge=0)
    min_samples: int = Field(200, ge=2)
    confirm_ticks: int = Field(2, ge=1)
    max_duration_s: float = Field(gt=0)
    min_weight_change_pct: float = Field(1.0, ge=0, lt=50)
    draws: int = Field(4000, ge=100, le=100_000)

    @model_validator(mode="after")
    def _bandit_shape(self) -> BanditStep:
        if self.arms != 2:
            raise ValueError(
                f"arms: {self.arms} arms asked for, but the router serves exactly two slots "
                "(stable and candidate); a bandit step has arms: 2"
            )
        if REWARD_KINDS[self.reward_metric] != self.reward:
            raise ValueError(
                f"reward_metric {self.reward_metric} is {REWARD_KINDS[self.reward_metric]}, not {self.reward}"
            )
        if self.max_duration_s < self.duration_s:
            raise ValueError(f"max_duration_s {self.max_duration_s:g} < duration_s {self.duration_s:g}")
        if not self.floor * 100 <= self.initial_pct <= 100 - self.floor * 100:
            raise ValueError(f"initial_pct {self.initial_pct:g} is outside the floor {self.floor:g}")
        return self


Step = Annotated[
    ReplayStep | ShadowStep | CanaryStep | ABStep | BanditStep | ApprovalStep | BlueGreenStep | DeviceStep,
    Field(discriminator="kind"),
]


class RolloutPlan(StrictModel):
    """An ordered list of steps ending in the ``blue_green`` cutover, and the tick interval.

    ``tick_interval_s`` is how often the orchestrator observes and calls ``decide``; every
    counted limit is in ticks, so ``inconclusive_limit: 12`` at a 5 s tick grants a check
    one more minute after its step's duration.

    ``offline_gate`` is what the registry's promotion gate (the candidate's offline metrics
    against the champion's) means to the rollout, which ends by promoting: ``enforce``
    refuses to start a rollout of a candidate that does not pass it, before any traffic
    moves; ``advisory`` logs the verdict and lets the live gates alone decide.
    """

    name: str = Field(min_length=1)
    description: str = ""
    tick_interval_s: float = Field(gt=0)
    offline_gate: Literal["enforce", "advisory"] = "enforce"
    steps: tuple[Step, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> RolloutPlan:
        kinds = [s.kind for s in self.steps]
        server = kinds[: len(kinds) - 1] if kinds[-1] == "devices" else kinds
        if kinds.count("blue_green") != 1 or server[-1] != "blue_green" or "devices" in server:
            raise ValueError(
                "a plan ends with exactly one blue_green step (the only step that promotes), "
                "optionally followed by one devices step"
            )
        names = [step_label(self, i) for i in range(len(self.steps))]
        require_unique(names, "step names")
        if not any(k in ("shadow", "canary", "ab", "bandit") for k in kinds):
            raise ValueError("a plan needs at least one shadow, canary, ab or bandit step before the cutover")
        return self

    @property
    def digest(self) -> str:
        """A short hash of the plan's content: a rollout refuses to continue under another.

        ``offline_gate`` counts only when it is not the default, so rollouts persisted before
        the field existed resume under their own plan (the gate is checked only at the start)."""
        skip = {"offline_gate"} if self.offline_gate == "enforce" else None
        return hashlib.blake2b(self.model_dump_json(exclude=skip).encode(), digest_size=8).hexdigest()


def step_label(plan: RolloutPlan, index: int) -> str:
    """The step's ``name``, or its kind (numbered when the kind repeats)."""
    step = plan.steps[index]
    if step.name:
        return step.name
    same = [i for i, s in enumerate(plan.steps) if s.kind == step.kind and not s.name]
    return step.kind if len(same) == 1 else f"{step.kind}-{same.index(index) + 1}"


def load_plan(path: str | Path) -> RolloutPlan:
    """Read and validate a rollout plan; a bad one raises ``ConfigError`` naming file and field."""
    p = Path(path)
    return validate_model(RolloutPlan, read_yaml(p), str(p))
