"""Traffic simulator (mlops.rollout.simulator), and whole rollouts driven by it in process.

The end-to-end cases wire the pure pieces the way the rollout flow will (simulated traffic
-> prediction-log rows -> ``observe`` -> ``decide`` -> effects applied to the router), with
a virtual clock, so a demo-plan rollout takes seconds.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlops.datagen import fraud_schema
from mlops.rollout import machine as m
from mlops.rollout.observe import observe, observe_replay
from mlops.rollout.plan import ABStep, ReplayStep, RolloutPlan, load_plan
from mlops.rollout.simulator import (
    PATHOLOGIES,
    Pathology,
    SimulatedModel,
    SimulatedService,
    SimulatorConfig,
    TrafficSimulator,
    run_window,
)
from mlops.routing import Mode, RouteTable

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 1, tzinfo=UTC)
BASE = SimulatedModel()


def _service(cfg: SimulatorConfig, table: RouteTable) -> SimulatedService:
    service = SimulatedService(cfg, model_name="fraud", stable_version=3, candidate_version=4)
    service.apply(table, 3, 4)
    return service


def test_same_seed_same_traffic_and_labels() -> None:
    """Two simulators with one config and the same calls produce identical requests and
    labels; another seed produces other traffic."""
    cfg = SimulatorConfig(seed=4, rate_per_s=50)
    a, b, c = (
        TrafficSimulator(cfg, T0),
        TrafficSimulator(cfg, T0),
        TrafficSimulator(cfg.model_copy(update={"seed": 5}), T0),
    )
    for t in (10, 20, 30):
        until = T0 + timedelta(seconds=t)
        ba, bb, bc = a.requests_until(until), b.requests_until(until), c.requests_until(until)
        pd.testing.assert_frame_equal(ba.frame, bb.frame)
        assert not ba.frame["entity_key"].equals(bc.frame["entity_key"])
        pd.testing.assert_frame_equal(a.labels_until(until), b.labels_until(until))
    with pytest.raises(ValueError, match="only moves forward"):
        a.requests_until(T0)


def test_labels_arrive_once_after_their_request() -> None:
    """Every label is the generated row's true label, arrives at or after its request,
    about ``label_delay_s`` later on average, and only once; ``label_share`` of requests
    ever get one."""
    cfg = SimulatorConfig(seed=1, rate_per_s=100, label_delay_s=8, label_share=0.5)
    sim = TrafficSimulator(cfg, T0)
    batches = [sim.requests_until(T0 + timedelta(seconds=s)) for s in range(10, 130, 10)]
    labels = pd.concat(
        [sim.labels_until(T0 + timedelta(seconds=s)) for s in range(0, 400, 7)], ignore_index=True
    )
    frame = pd.concat([b.frame for b in batches], ignore_index=True).set_index("request_id")
    assert labels["request_id"].is_unique
    assert abs(len(labels) / len(frame) - 0.5) < 0.03
    sent = frame.loc[labels["request_id"]]
    assert np.array_equal(labels["label"].to_numpy(), sent["label"].to_numpy())
    delay = (labels["ts"].to_numpy() - sent["ts"].to_numpy()) / np.timedelta64(1, "s")
    assert delay.min() >= 0 and 7 < delay.mean() < 9
    assert sim.labels_until(T0 + timedelta(days=1)).empty


def test_payloads_carry_every_feature_as_json() -> None:
    """A driver sends request id, entity and the schema's features, JSON-serialisable."""
    batch = TrafficSimulator(SimulatorConfig(rate_per_s=20), T0).requests_until(T0 + timedelta(seconds=5))
    payloads = list(batch.payloads())
    assert len(payloads) == len(batch) > 0
    assert set(payloads[0]["features"]) == set(fraud_schema().feature_names)
    json.dumps(payloads)


def test_canary_users_are_sticky_and_shadow_mirrors_its_share() -> None:
    """Under a canary table every user sees one variant in every batch; under shadow the
    candidate answers about mirror_pct of requests as shadow rows and users only see stable."""
    cfg = SimulatorConfig(seed=3, rate_per_s=300)
    sim = TrafficSimulator(cfg, T0)
    service = _service(cfg, RouteTable(mode=Mode.CANARY, weight_pct=25, salt="r-1"))
    log, _ = run_window(sim, service, 40, 5)
    per_user = log.groupby("entity_key")["variant"].nunique()
    assert per_user.max() == 1
    share = (log.groupby("entity_key")["variant"].first() == "candidate").mean()
    assert 0.15 < share < 0.35
    service.apply(RouteTable(mode=Mode.SHADOW, mirror_pct=20, salt="r-1"), 3, 4)
    log, _ = run_window(sim, service, 20, 5)
    primary = log[log["role"] == "primary"]
    assert set(primary["variant"]) == {"stable"}
    assert abs((log["role"] == "shadow").sum() / len(primary) - 0.2) < 0.03


@pytest.mark.parametrize("name", ["slower", "erroring", "less_accurate", "drifted"])
def test_pathologies_show_in_the_observations(name: str) -> None:
    """Each candidate pathology is visible in what the gates read: 3x latency, 5 % errors,
    a lower AUC, a drifted score distribution; the stable model is unaffected."""
    cfg = SimulatorConfig(seed=7, rate_per_s=300, pathology=PATHOLOGIES[name])
    service = _service(cfg, RouteTable(mode=Mode.SHADOW, mirror_pct=100, salt="r"))
    ref_batch = TrafficSimulator(cfg.model_copy(update={"seed": 99}), T0).requests_until(
        T0 + timedelta(seconds=20)
    )
    refs = service.references(ref_batch)
    log, fb = run_window(TrafficSimulator(cfg, T0), service, 40, 10)
    obs = observe(log, fb, stable_version=3, candidate_version=4, references=refs)
    s, c = obs.stable, obs.candidate
    assert s.errors == 0 and s.score_psi < 0.05
    if name == "slower":
        assert 2.7 < c.latency_p99_ms / s.latency_p99_ms < 3.3
    elif name == "erroring":
        assert 0.04 < c.error_rate < 0.06
    elif name == "less_accurate":
        assert c.auc < s.auc - 0.1 and c.score_psi < 0.1  # worse, but as it was in training
    else:
        assert c.score_psi > 0.25 and abs(c.auc - s.auc) < 0.03


def test_input_drift_moves_the_input_psi() -> None:
    """Traffic generated with datagen drift has a large input PSI against an undrifted
    reference; undrifted traffic does not."""
    ref_cfg = SimulatorConfig(seed=99, rate_per_s=400)
    service = _service(ref_cfg, RouteTable())
    refs = service.references(TrafficSimulator(ref_cfg, T0).requests_until(T0 + timedelta(seconds=30)))
    psi = {}
    for drift in (0.0, 1.0):
        cfg = SimulatorConfig(seed=8, rate_per_s=300, input_drift=drift)
        log, _ = run_window(TrafficSimulator(cfg, T0), _service(cfg, RouteTable()), 20, 10)
        psi[drift] = observe(log, stable_version=3, candidate_version=4, references=refs).stable.input_psi
    assert psi[0.0] < 0.05 < 0.2 < psi[1.0]


# --------------------------------------------------------------------------- whole rollouts


def drive(
    plan: RolloutPlan, cfg: SimulatorConfig, *, approve: bool = True, ticks: int = 200
) -> tuple[m.RolloutStatus, SimulatedService]:
    """The rollout flow's loop, in process: traffic for one tick, observe the step's window,
    decide, apply the effects to the simulated service, record them applied."""
    sim = TrafficSimulator(cfg, T0)
    service = SimulatedService(cfg, model_name="fraud", stable_version=3, candidate_version=4)
    offline = TrafficSimulator(cfg.model_copy(update={"seed": cfg.seed + 1000, "input_drift": 0.0}), T0)
    refs = service.references(offline.requests_until(T0 + timedelta(seconds=30)))
    status = m.start(
        "sim-1",
        plan,
        model_name="fraud",
        stable_version=3,
        candidate_version=4,
        aliases={"champion": 3, "challenger": 4},
        now=T0,
    )
    logs: list[pd.DataFrame] = []
    labels: list[pd.DataFrame] = []
    now = T0
    for _ in range(ticks):
        now += timedelta(seconds=plan.tick_interval_s)
        logs.append(service.handle(sim.requests_until(now)))
        labels.append(sim.labels_until(now))
        step = plan.steps[status.step_index]
        obs = None
        if isinstance(step, ReplayStep):
            s, c, _ = service.replay(offline.requests_until(offline.clock + timedelta(seconds=20)))
            obs = observe_replay(s, c, stable_version=3, candidate_version=4, references=refs)
        elif status.window_start is not None:
            log = pd.concat(logs, ignore_index=True)
            log = log[log["ts"] >= status.window_start]
            logs = [log]
            obs = observe(
                log,
                pd.concat(labels, ignore_index=True),
                stable_version=3,
                candidate_version=4,
                since=status.window_start,
                until=now,
                references=refs if step.needs_reference else None,
                ab_metric=step.primary.metric if isinstance(step, ABStep) else None,
            )
        answer = None
        if status.phase is m.Phase.AWAITING_APPROVAL:
            answer = m.Signals(approval=m.ApprovalResponse(approved=approve, version=4, by="demo"))
        d = m.decide(status, obs, plan, now, answer)
        status = d.status
        for effect in d.effects:
            if effect.route is not None:
                service.apply(
                    effect.route.table(), effect.route.stable_version, effect.route.candidate_version
                )
            status = m.mark_applied(status, effect.key, now)
        if status.terminal:
            break
    return status, service


DEMO = load_plan(REPO / "configs/rollout/demo.yaml")


def test_demo_plan_rolls_back_a_three_times_slower_candidate_at_the_first_canary_weight() -> None:
    """Simulated end to end: a candidate with 3x latency passes replay and shadow (where
    latency is observed only) and is rolled back at canary 1 %, all traffic back on stable."""
    cfg = SimulatorConfig(seed=3, pathology=PATHOLOGIES["slower"])
    status, service = drive(DEMO, cfg)
    assert status.phase is m.Phase.ROLLED_BACK
    end = status.history[-1]
    assert end.step == "canary 1%" and "latency_p95_ms_vs_stable_ratio" in end.reason
    assert service.table.mode is Mode.SINGLE


def test_demo_plan_rolls_back_an_erroring_candidate() -> None:
    """Simulated end to end: a candidate failing 5 % of inputs fails the replay's error
    rate and never reaches live traffic."""
    status, service = drive(DEMO, SimulatorConfig(seed=3, pathology=PATHOLOGIES["erroring"]))
    assert status.phase is m.Phase.ROLLED_BACK
    end = status.history[-1]
    assert end.step == "replay" and "error_rate: candidate 0.049" in end.reason and "> max 0.01" in end.reason
    assert service.changes == 0


@pytest.mark.slow
def test_demo_plan_promotes_a_better_candidate_in_minutes_of_simulated_time() -> None:
    """Simulated end to end: a sharper candidate (lower noise, so better AUC and log loss)
    goes through every step of the demo plan and ends serving all traffic, within ten
    minutes of simulated time at 200 requests/s."""
    cfg = SimulatorConfig(seed=3, candidate=BASE.model_copy(update={"noise": 0.75}))
    status, service = drive(DEMO, cfg)
    assert status.phase is m.Phase.SUCCEEDED, status.history[-1].reason
    assert (status.updated_at - status.created_at) < timedelta(minutes=10)
    steps = []
    for h in status.history:
        if not steps or steps[-1] != h.step:
            steps.append(h.step)
    assert steps == [
        "replay",
        "shadow",
        "canary 1%",
        "canary 5%",
        "canary 25%",
        "canary 50%",
        "ab",
        "approval",
        "blue_green",
    ]
    assert service.table.mode is Mode.SINGLE and service.versions == {"stable": 4, "candidate": None}


def test_stream_yields_each_interval_once() -> None:
    """``stream`` cuts time into ``step_s`` intervals up to ``until``: every request is
    yielded once, in order, with the labels that arrived by the end of its interval."""
    sim = TrafficSimulator(SimulatorConfig(seed=6, rate_per_s=50, label_delay_s=2), T0)
    out = list(sim.stream(T0 + timedelta(seconds=12), 5))
    assert [t for t, _, _ in out] == [pd.Timestamp(T0 + timedelta(seconds=s)) for s in (5, 10, 12)]
    ids = pd.concat([b.frame["request_id"] for _, b, _ in out])
    assert ids.is_unique and len(ids) > 400
    for t, batch, labels in out:
        assert (batch.frame["ts"] < t).all() and (labels["ts"] <= t).all()


def test_pathology_perturbs_real_answers_deterministically_per_input() -> None:
    """A fault-injecting wrapper gets, per input key, the same failure and noise every time:
    about error_share of inputs fail, latency grows by the factor, scores shift."""
    keys = [f"h{i}" for i in range(20_000)]
    scores = np.full(len(keys), 0.1)
    latency = np.full(len(keys), 10.0)
    p = Pathology(
        error_share=0.05, latency_factor=3.0, extra_latency_ms=1.0, score_shift=1.0, extra_noise=0.5
    )
    s1, d1, f1 = p.perturb(scores, keys, latency)
    s2, d2, f2 = p.perturb(scores, keys, latency)
    assert np.array_equal(f1, f2) and np.array_equal(s1, s2)
    assert abs(f1.mean() - 0.05) < 0.01 and np.allclose(d1, 21.0)
    logit = np.log(s1 / (1 - s1)) - np.log(0.1 / 0.9)
    assert abs(logit.mean() - 1.0) < 0.02 and abs(logit.std() - 0.5) < 0.02
    none = Pathology().perturb(scores, keys, latency)
    assert np.allclose(none[0], scores) and not none[1].any() and not none[2].any()
