"""Traffic-router decisions (mlops.routing): pure, deterministic, sticky."""

from __future__ import annotations

import threading

import pytest

from mlops.errors import ConfigError
from mlops.routing import (
    BUCKETS,
    CANDIDATE,
    STABLE,
    InvalidRouteTable,
    Mode,
    RouteDecision,
    RouteTable,
    route,
)

USERS = [f"user-{i}" for i in range(10_000)]
RAMP = (1, 5, 25, 50, 100)


def _candidates(table: RouteTable, users: list[str] = USERS) -> set[str]:
    return {u for u in users if route(table, u, f"req-{u}").variant == CANDIDATE}


def _share_tolerance(pct: float, n: int) -> float:
    """Five binomial standard deviations, in percentage points."""
    p = pct / 100
    return 500 * (p * (1 - p) / n) ** 0.5 + 1e-9


# ------------------------------------------------------------------------- canary


def test_canary_ramp_moves_users_one_way_and_hits_each_weight():
    """Given 10,000 users and a canary ramped 1 -> 5 -> 25 -> 50 -> 100 %, when each user
    is routed at every step, then each step's candidate share is within 5 sigma of its
    weight and every user on the candidate at one step is still there at the next."""
    table = RouteTable(mode=Mode.CANARY, weight_pct=0, salt="rollout-7")
    moved: set[str] = set()
    for weight in RAMP:
        table = table.ramped(weight)
        now = _candidates(table)
        assert moved <= now, f"{len(moved - now)} users flipped back at {weight}%"
        share = 100 * len(now) / len(USERS)
        assert abs(share - weight) <= _share_tolerance(weight, len(USERS)), (weight, share)
        moved = now
    assert moved == set(USERS)


def test_canary_at_zero_weight_keeps_everyone_on_stable():
    """A canary table at 0 % sends no entity to the candidate."""
    table = RouteTable(mode=Mode.CANARY, weight_pct=0, salt="r")
    assert _candidates(table) == set()


def test_canary_decision_depends_on_entity_not_request():
    """The same user gets the same variant whatever the request id (stickiness)."""
    table = RouteTable(mode=Mode.CANARY, weight_pct=50, salt="r")
    for user in USERS[:500]:
        variants = {route(table, user, f"req-{n}").variant for n in range(5)}
        assert len(variants) == 1


def test_canary_bucket_is_inside_iff_below_weight_times_100():
    """A user is on the candidate exactly when its bucket < weight_pct * 100."""
    table = RouteTable(mode=Mode.CANARY, weight_pct=12.5, salt="r")
    for user in USERS[:2000]:
        bucket = table.bucket(user)
        assert 0 <= bucket < BUCKETS
        assert (route(table, user, "x").variant == CANDIDATE) == (bucket < 1250)


def test_a_new_salt_picks_different_first_canaries():
    """Two rollouts with different salts put (mostly) different users first in line."""
    first = _candidates(RouteTable(mode=Mode.CANARY, weight_pct=5, salt="rollout-1"))
    second = _candidates(RouteTable(mode=Mode.CANARY, weight_pct=5, salt="rollout-2"))
    overlap = len(first & second) / len(first)
    assert overlap < 0.2  # independent draws overlap ~5 %


def test_routing_is_deterministic_across_table_instances():
    """Equal tables built separately route every user identically (no process state)."""
    a = RouteTable(mode=Mode.AB, weight_pct=30, salt="exp-1")
    b = RouteTable(mode="ab", weight_pct=30.0, salt="exp-1")
    assert a == b
    assert _candidates(a) == _candidates(b)


def test_without_entity_key_the_split_falls_back_to_the_request_id():
    """A request with no entity key is split by its request id, and the reason says so;
    the share still matches the weight."""
    table = RouteTable(mode=Mode.CANARY, weight_pct=25, salt="r")
    decisions = [route(table, None, f"req-{i}") for i in range(10_000)]
    share = 100 * sum(d.variant == CANDIDATE for d in decisions) / len(decisions)
    assert abs(share - 25) <= _share_tolerance(25, len(decisions))
    assert all("no entity key" in d.reason for d in decisions)
    assert route(table, None, "req-1") == route(table, None, "req-1")


# ------------------------------------------------------------------------- A/B


def test_ab_split_is_sticky_and_records_the_arm():
    """In ab mode a 50 % split gives each user one arm for good, named in the decision."""
    table = RouteTable(mode=Mode.AB, weight_pct=50, salt="exp-9")
    arms = {u: route(table, u, "r1") for u in USERS}
    share = 100 * sum(d.variant == CANDIDATE for d in arms.values()) / len(USERS)
    assert abs(share - 50) <= _share_tolerance(50, len(USERS))
    for user, first in list(arms.items())[:1000]:
        again = route(table, user, "r2")
        assert again == first
        assert again.reason.startswith("ab: ")
        assert again.mirror is False


@pytest.mark.parametrize("mode", [Mode.AB, Mode.CANARY])
@pytest.mark.parametrize("forced", [STABLE, CANDIDATE])
def test_forced_header_overrides_the_split(mode, forced):
    """A forced variant wins over the user's bucket, and the reason names the header."""
    table = RouteTable(mode=mode, weight_pct=50, salt="exp")
    for user in USERS[:200]:
        decision = route(table, user, "r", forced_variant=forced)
        assert decision.variant == forced
        assert "forced" in decision.reason and "x-mlops-variant" in decision.reason


def test_forced_header_with_unknown_value_is_rejected():
    """A forced variant other than stable/candidate is a ValueError naming the value."""
    table = RouteTable(mode=Mode.AB, weight_pct=50, salt="exp")
    with pytest.raises(ValueError, match="'blue'"):
        route(table, "u", "r", forced_variant="blue")


@pytest.mark.parametrize(
    "table",
    [RouteTable(), RouteTable(mode=Mode.SHADOW, mirror_pct=100, salt="s")],
    ids=["single", "shadow"],
)
def test_forcing_the_candidate_is_ignored_where_it_must_not_answer(table):
    """In single and shadow mode the candidate never answers, even when forced."""
    decision = route(table, "u", "r", forced_variant=CANDIDATE)
    assert decision.variant == STABLE
    assert "ignored" in decision.reason


# ------------------------------------------------------------------------- shadow


def test_shadow_mirrors_the_configured_share_and_stable_always_answers():
    """Given shadow at 10 %, when 20,000 requests are routed, then stable answers all of
    them and the mirrored share is within 5 sigma of 10 %."""
    table = RouteTable(mode=Mode.SHADOW, mirror_pct=10, salt="shadow-1")
    decisions = [route(table, "same-user", f"req-{i}") for i in range(20_000)]
    assert {d.variant for d in decisions} == {STABLE}
    share = 100 * sum(d.mirror for d in decisions) / len(decisions)
    assert abs(share - 10) <= _share_tolerance(10, len(decisions))


def test_shadow_sampling_is_deterministic_per_request_id():
    """The same request id is always mirrored, or always not (a retry is not re-sampled)."""
    table = RouteTable(mode=Mode.SHADOW, mirror_pct=37, salt="s")
    for i in range(1000):
        rid = f"req-{i}"
        assert route(table, "a", rid) == route(table, "b", rid)


@pytest.mark.parametrize("pct, expected", [(0, False), (100, True)])
def test_shadow_at_the_extremes_mirrors_nothing_or_everything(pct, expected):
    """mirror_pct 0 never mirrors; 100 always does."""
    table = RouteTable(mode=Mode.SHADOW, mirror_pct=pct, salt="s")
    assert {route(table, "u", f"r{i}").mirror for i in range(2000)} == {expected}


def test_only_shadow_mirrors():
    """No other mode ever sets mirror."""
    tables = [
        RouteTable(),
        RouteTable(mode=Mode.CANARY, weight_pct=50, salt="s"),
        RouteTable(mode=Mode.AB, weight_pct=50, salt="s"),
        RouteTable(mode=Mode.BLUE_GREEN),
    ]
    for table in tables:
        assert not any(route(table, f"u{i}", f"r{i}").mirror for i in range(500))


# ------------------------------------------------------------------------- blue-green and single


def test_single_sends_everything_to_stable():
    """The default table routes every request to stable."""
    table = RouteTable()
    assert {route(table, u, "r").variant for u in USERS[:1000]} == {STABLE}


def test_blue_green_flip_moves_all_traffic_at_once_and_flips_back():
    """Given blue-green on stable, when the table is flipped, then every request goes to
    candidate; flipping again restores the original table."""
    blue = RouteTable(mode=Mode.BLUE_GREEN)
    green = blue.flipped()
    assert {route(blue, u, "r").variant for u in USERS[:1000]} == {STABLE}
    assert {route(green, u, "r").variant for u in USERS[:1000]} == {CANDIDATE}
    assert green.flipped() == blue
    assert blue.active_slot == STABLE  # the original table is untouched


def test_blue_green_forced_header_reaches_the_idle_slot():
    """Before a flip, a forced request can smoke-test the idle slot."""
    table = RouteTable(mode=Mode.BLUE_GREEN)
    assert route(table, "qa", "r", forced_variant=CANDIDATE).variant == CANDIDATE


def test_swapping_the_table_reference_is_atomic_under_concurrent_routing():
    """Readers routing while a writer flips the shared table see, per request, either
    the whole old table or the whole new one: the slot always matches the table read."""
    holder = {"table": RouteTable(mode=Mode.BLUE_GREEN)}
    stop = threading.Event()
    mismatches: list[tuple[str, str]] = []

    def reader() -> None:
        while not stop.is_set():
            table = holder["table"]
            decision = route(table, "u", "r")
            if decision.variant != table.active_slot:
                mismatches.append((decision.variant, table.active_slot))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(2000):
        holder["table"] = holder["table"].flipped()
    stop.set()
    for t in threads:
        t.join()
    assert mismatches == []


def test_tables_are_immutable():
    """A table cannot be changed in place; ramps and flips return new tables."""
    table = RouteTable(mode=Mode.CANARY, weight_pct=5, salt="s")
    with pytest.raises(AttributeError):
        table.weight_pct = 50  # type: ignore[misc]
    assert table.ramped(50).weight_pct == 50 and table.weight_pct == 5


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "rainbow"}, "mode must be one of"),
        ({"mode": "canary", "weight_pct": 101, "salt": "s"}, "weight_pct must be between 0 and 100"),
        ({"mode": "canary", "weight_pct": -1, "salt": "s"}, "weight_pct must be between 0 and 100"),
        ({"mode": "canary", "weight_pct": float("nan"), "salt": "s"}, "between 0 and 100"),
        ({"mode": "canary", "weight_pct": "5", "salt": "s"}, "weight_pct must be a number"),
        ({"mode": "canary", "weight_pct": True, "salt": "s"}, "weight_pct must be a number"),
        ({"mode": "canary", "weight_pct": 1.234, "salt": "s"}, "at most two decimals"),
        ({"mode": "shadow", "mirror_pct": 150, "salt": "s"}, "mirror_pct must be between 0 and 100"),
        ({"mode": "canary", "weight_pct": 5}, "canary needs a non-empty salt"),
        ({"mode": "shadow", "mirror_pct": 5}, "shadow needs a non-empty salt"),
        ({"mode": "shadow", "weight_pct": 5, "salt": "s"}, "weight_pct applies to canary and ab"),
        ({"mode": "canary", "mirror_pct": 5, "salt": "s"}, "mirror_pct applies to shadow"),
        ({"mode": "canary", "active_slot": "candidate", "salt": "s"}, "active_slot applies"),
        ({"mode": "blue_green", "active_slot": "green"}, "active_slot must be 'stable' or"),
        ({"mode": "ab", "weight_pct": 5, "salt": "x" * 300}, "salt is longer than"),
    ],
)
def test_invalid_tables_are_rejected_with_a_message_naming_the_field(kwargs, message):
    """A table with an out-of-range or inapplicable setting cannot be built; the error is
    a ValueError (and a ConfigError) whose message names the offending field."""
    with pytest.raises(InvalidRouteTable, match=message) as info:
        RouteTable(**kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ConfigError)


def test_ramp_and_flip_are_refused_by_the_wrong_mode():
    """Only canary/ab tables ramp and only blue-green tables flip; a ramp is validated."""
    with pytest.raises(InvalidRouteTable, match="only canary and ab tables ramp"):
        RouteTable().ramped(5)
    with pytest.raises(InvalidRouteTable, match="only blue_green tables flip"):
        RouteTable(mode=Mode.CANARY, salt="s").flipped()
    with pytest.raises(InvalidRouteTable, match="between 0 and 100"):
        RouteTable(mode=Mode.CANARY, salt="s").ramped(120)


def test_decision_is_a_small_value():
    """A decision is a plain (variant, mirror, reason, forced) value, equal by content; only
    an honoured x-mlops-variant header makes it forced."""
    decision = route(RouteTable(), "u", "r")
    assert decision == RouteDecision(STABLE, False, "single: stable only")
    variant, mirror, reason, forced = decision
    assert (variant, mirror, forced) == (STABLE, False, False) and reason
    canary = RouteTable(Mode.CANARY, weight_pct=50, salt="s")
    assert route(canary, "u", "r", "candidate").forced and not route(canary, "u", "r").forced
    assert not route(RouteTable(), "u", "r", "candidate").forced  # ignored in single: routed
