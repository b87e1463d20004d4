"""Rolling-window features: one definition, offline and incremental computations that agree,
point-in-time correctness and its checker, lateness, and the persisted stream state."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlops.datagen import generate
from mlops.errors import ConfigError, DataError
from mlops.features import (
    NS_PER_SECOND,
    FeatureSet,
    LeakDetected,
    StateMismatch,
    StreamFeatures,
    assert_point_in_time,
    check_point_in_time,
    compute_offline,
    timestamps_ns,
    with_features,
)
from mlops.settings import load_settings

FEATURES_YAML = Path(__file__).resolve().parent.parent / "configs" / "features.yaml"
T0 = pd.Timestamp("2026-01-01")


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return FeatureSet.from_settings(load_settings(FEATURES_YAML, environ={}))


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    """Generated card transactions spread over three days (one per block), raw event columns only."""
    df = generate(30_000, seed=11)[["transaction_id", "user_id", "event_time", "amount"]]
    # Spread the day over three so that the 1 h / 24 h windows start and end inside the data.
    offsets = pd.to_timedelta(np.arange(len(df)) % 3, unit="D")
    return df.assign(event_time=df["event_time"] + offsets).reset_index(drop=True)


def _small_fs(**over: object) -> FeatureSet:
    windows = [
        {"name": "n_10s", "agg": "count", "window_seconds": 10},
        {"name": "sum_10s", "agg": "sum", "column": "amount", "window_seconds": 10},
        {"name": "mean_10s", "agg": "mean", "column": "amount", "window_seconds": 10},
        {"name": "max_10s", "agg": "max", "column": "amount", "window_seconds": 10, "default": -1.0},
        {"name": "last_10s", "agg": "last", "column": "amount", "window_seconds": 10},
        {"name": "since_10s", "agg": "seconds_since_last", "window_seconds": 10},
    ]
    env = {"MLOPS__FEATURES__WINDOWS": json.dumps(windows)}
    env.update({f"MLOPS__FEATURES__{k.upper()}": str(v) for k, v in over.items()})
    return FeatureSet.from_settings(load_settings(environ=env))


def _frame(rows: list[tuple[str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "event_time": [T0 + pd.Timedelta(seconds=r[1]) for r in rows],
            "amount": [r[2] for r in rows],
        }
    )


def test_each_aggregate_sees_only_events_strictly_before_within_the_window() -> None:
    """Given hand-placed events, each aggregate counts events with t - w <= time < t: the row's
    own event and a simultaneous one are excluded, an event exactly w seconds earlier is
    included, another entity's events never count, and an empty window gives the default; the
    stream state answers each event the same."""
    fs = _small_fs()
    ev = _frame(
        [("a", 0, 5.0), ("a", 4, 7.0), ("b", 5, 100.0), ("a", 10, 1.0), ("a", 10, 2.0), ("a", 15, 3.0)]
    )
    got = compute_offline(fs, ev).to_pandas()
    # a@0: nothing before.  a@4: {0}.  b@5: nothing of b.  a@10 (x2): {0, 4} (0 is exactly 10 s back).
    # a@15: {10, 10} (0 and 4 fell out, 10 and 10 are before 15).
    assert got["n_10s"].tolist() == [0, 1, 0, 2, 2, 2]
    assert got["sum_10s"].tolist() == [0, 5, 0, 12, 12, 3]
    assert got["mean_10s"].tolist() == [0, 5, 0, 6, 6, 1.5]
    assert got["max_10s"].tolist() == [-1, 5, -1, 7, 7, 2]
    assert got["last_10s"].tolist() == [0, 5, 0, 7, 7, 2]
    assert got["since_10s"].tolist() == [10, 4, 10, 6, 6, 5]
    # The stream, fed the same events in order, answers each one identically.
    state = StreamFeatures(fs)
    updates = state.replay(ev["user_id"], timestamps_ns(ev["event_time"]), {"amount": ev["amount"]})
    assert pd.DataFrame([u.features for u in updates]).equals(got)


def test_offline_and_incremental_agree_on_generated_events(fs: FeatureSet, events: pd.DataFrame) -> None:
    """Replaying generated events one by one through the stream state gives, for every event,
    the features the offline computation gives over the whole frame: counts, maxima, last
    values and seconds exactly, sums and means to 1e-9."""
    offline = compute_offline(fs, events)
    order = np.argsort(events["event_time"].to_numpy(), kind="stable")
    state = StreamFeatures(fs)
    updates = state.replay(
        events["user_id"].to_numpy()[order],
        timestamps_ns(events["event_time"])[order],
        {"amount": events["amount"].to_numpy()[order]},
    )
    assert state.late_events == 0
    diffs = {}
    for name in fs.names:
        incremental = np.empty(len(events))
        incremental[order] = [u.features[name] for u in updates]
        diffs[name] = float(np.abs(incremental - offline.column(name).to_numpy()).max())
    print("max abs diff per feature:", diffs)
    exact = [w.name for w in fs.windows if w.agg not in ("sum", "mean")]
    assert all(diffs[n] == 0.0 for n in exact), diffs
    assert all(diffs[n] <= 1e-9 for n in fs.names), diffs
    assert offline.column("user_txn_count_24h").to_numpy().max() > 5  # the windows are not trivially empty


def test_out_of_order_events_within_lateness_end_in_the_same_state(
    fs: FeatureSet, events: pd.DataFrame
) -> None:
    """Events that arrive up to the allowed lateness out of order are placed in time order: after
    the replay, a lookup at any time at or after the watermark equals the offline computation
    over the same events; an event older than the watermark is counted late and left out."""
    rng = np.random.default_rng(5)
    ts = timestamps_ns(events["event_time"])
    lateness = fs.lateness_ns
    arrival = np.argsort(ts + rng.integers(0, lateness, len(ts)), kind="stable")  # bounded disorder
    assert (np.diff(ts[arrival]) < 0).sum() > 1000
    state = StreamFeatures(fs)
    state.replay(
        events["user_id"].to_numpy()[arrival], ts[arrival], {"amount": events["amount"].to_numpy()[arrival]}
    )
    assert state.late_events == 0

    users = events["user_id"].drop_duplicates().to_numpy()[:300]
    at = state.watermark + rng.integers(0, 2 * 3600 * NS_PER_SECOND, len(users))
    rows = pd.DataFrame({"user_id": users, "event_time": pd.to_datetime(at)})
    expected = compute_offline(fs, events, rows).to_pandas()
    for i, user in enumerate(users):
        got = state.lookup(user, int(at[i]))
        for name in fs.names:
            assert got[name] == pytest.approx(expected.at[i, name], rel=1e-12, abs=1e-9), (user, name)

    too_old = state.watermark - 1
    before = state.lookup(users[0], state.max_ts + 1)
    update = state.update(users[0], too_old, {"amount": 50_000.0})
    assert update.late and state.late_events == 1
    assert state.lookup(users[0], state.max_ts + 1) == before


def test_state_keeps_only_what_future_lookups_can_see(fs: FeatureSet) -> None:
    """A week-long stream keeps about one longest window of events: older ones are pruned, and an
    entity that went quiet disappears from the state."""
    state = StreamFeatures(fs)
    hour = 3600 * NS_PER_SECOND
    t0 = int(T0.value)
    state.update("quiet", t0, {"amount": 1.0})
    for h in range(24 * 21):
        state.update("busy", t0 + h * hour, {"amount": float(h)})
    state.prune()
    assert state.entities == 1
    week_and_lateness = (fs.max_window_ns + fs.lateness_ns) // hour + 1
    assert state.retained_events <= week_and_lateness
    assert state.lookup("busy", state.max_ts + 1)["user_txn_count_24h"] == 24


def test_point_in_time_checker_passes_a_correct_training_set(fs: FeatureSet, events: pd.DataFrame) -> None:
    """A training set built by ``with_features`` passes the checker, with every count 0."""
    training = with_features(fs, events)
    report = assert_point_in_time(fs, training)
    assert report.ok and report.rows == len(events)
    assert {c.mismatched for c in report.checks} == {0}


def test_point_in_time_checker_catches_a_leak(fs: FeatureSet, events: pd.DataFrame) -> None:
    """Given a training set whose features were computed including the event at each row's own
    timestamp (a ``<=`` window), the checker names each leaking feature, counts the leaked
    rows, and the assertion raises LeakDetected."""
    shifted = events.assign(event_time=events["event_time"] + pd.Timedelta(nanoseconds=1))
    leaky_feats = compute_offline(fs, events, shifted)  # each row sees its own event
    training = pa.Table.from_pandas(events, preserve_index=False)
    for name in fs.names:
        training = training.append_column(name, leaky_feats.column(name))

    report = check_point_in_time(fs, training)
    assert not report.ok
    by_name = {c.name: c for c in report.checks}
    assert by_name["user_txn_count_1h"].mismatched == len(events)  # every row counts itself
    assert by_name["user_txn_count_1h"].leaked == len(events)
    assert by_name["user_last_amount_24h"].leaked > 0.9 * len(events)
    with pytest.raises(LeakDetected, match="user_txn_count_1h: 30000 of 30000 rows"):
        assert_point_in_time(fs, training)


def test_point_in_time_checker_flags_features_from_a_later_snapshot(
    fs: FeatureSet, events: pd.DataFrame
) -> None:
    """Features taken from a snapshot an hour after each row (a later table joined on entity)
    are reported as not point-in-time correct."""
    later = events.assign(event_time=events["event_time"] + pd.Timedelta(hours=1))
    feats = compute_offline(fs, events, later).to_pandas()
    training = pd.concat([events, feats], axis=1)
    report = check_point_in_time(fs, training)
    assert not report.ok
    assert {c.name for c in report.checks if c.mismatched} >= {"user_txn_count_1h", "user_txn_count_24h"}


def test_offline_features_for_separate_rows(fs: FeatureSet, events: pd.DataFrame) -> None:
    """Rows to score (entity, time) get the features of the events strictly before them; an
    entity without events gets the empty-window values."""
    rows = pd.DataFrame(
        {
            "user_id": [events["user_id"].iloc[0], "nobody"],
            "event_time": [events["event_time"].max() + pd.Timedelta(seconds=1), T0],
        }
    )
    got = compute_offline(fs, events, pa.Table.from_pandas(rows, preserve_index=False)).to_pandas()
    ev = events[events["user_id"] == rows.at[0, "user_id"]]
    day = ev[ev["event_time"] >= rows.at[0, "event_time"] - pd.Timedelta(days=1)]
    assert got.at[0, "user_txn_count_24h"] == len(day)
    assert got.at[0, "user_amount_sum_24h"] == pytest.approx(day["amount"].sum())
    assert got.at[0, "user_amount_max_24h"] == day["amount"].max()
    assert got.loc[1].tolist() == [0, 0, 0, 0, 0, 0, 7 * 86400]


def test_state_round_trips_through_a_table_and_refuses_other_declarations(fs: FeatureSet) -> None:
    """Saved state restores to the same lookups and counters; state saved for other feature
    declarations is refused rather than silently reused."""
    state = StreamFeatures(fs)
    t0 = int(T0.value)
    for i in range(50):
        state.update(f"u{i % 7}", t0 + i * 60 * NS_PER_SECOND, {"amount": float(i)})
    state.update("u1", t0, {"amount": 1.0})  # late
    restored = StreamFeatures.from_table(fs, state.to_table())
    assert (restored.max_ts, restored.late_events, restored.events_seen) == (state.max_ts, 1, 51)
    for u in range(7):
        assert restored.lookup(f"u{u}", state.max_ts + 1) == state.lookup(f"u{u}", state.max_ts + 1)
    with pytest.raises(StateMismatch, match="rebuild it from the events"):
        StreamFeatures.from_table(_small_fs(), state.to_table())


def test_bad_events_are_data_errors(fs: FeatureSet) -> None:
    """Missing columns, missing values and non-time timestamps are DataErrors naming the column."""
    ev = _frame([("a", 0, 1.0)])
    with pytest.raises(DataError, match="no column 'amount'"):
        compute_offline(fs, ev.drop(columns="amount"))
    with pytest.raises(DataError, match="'amount' has 1 missing"):
        compute_offline(fs, ev.assign(amount=np.nan))
    with pytest.raises(DataError, match="expected timestamps"):
        compute_offline(fs, ev.assign(event_time=[1]))
    with pytest.raises(DataError, match="no value for 'amount'"):
        StreamFeatures(fs).update("a", 0, {})


def test_timezone_aware_times_are_compared_in_utc() -> None:
    """The same instants given in UTC and in another zone produce the same nanosecond times."""
    utc = pd.Series(pd.to_datetime(["2026-01-01 12:00"]).tz_localize("UTC"))
    paris = utc.dt.tz_convert("Europe/Paris")
    assert timestamps_ns(utc).tolist() == timestamps_ns(paris).tolist()
    assert timestamps_ns(
        pa.chunked_array([pa.array([datetime(2026, 1, 1, 12)], pa.timestamp("us"))])
    ).tolist() == (timestamps_ns(utc).tolist())


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        ("[{name: x, agg: sum, window_seconds: 5}]", "needs a column"),
        ("[{name: x, agg: count, column: amount, window_seconds: 5}]", "takes no column"),
        ("[{name: x, agg: count, window_seconds: 0}]", "window_seconds"),
        (
            "[{name: x, agg: count, window_seconds: 5}, {name: x, agg: count, window_seconds: 9}]",
            "used twice",
        ),
        ("[{name: amount, agg: count, window_seconds: 5}]", "already a dataset column"),
        ("[{name: x, agg: mean, column: channel, window_seconds: 5}]", "not a numeric dataset column"),
        ("[{name: x, agg: median, column: amount, window_seconds: 5}]", "agg"),
    ],
)
def test_feature_declarations_are_validated(windows: str, message: str) -> None:
    """A feature declaration that cannot be computed is a config error naming the problem."""
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={"MLOPS__FEATURES__WINDOWS": windows})


def test_no_declared_features_is_a_config_error() -> None:
    """Asking for the feature set of a config that declares none fails loud."""
    with pytest.raises(ConfigError, match="no window features"):
        FeatureSet.from_settings(load_settings(environ={}))


OTHER_VIEW = [
    {"name": "user_txn_count_30d", "agg": "count", "window_seconds": 30 * 86400},
    {"name": "user_amount_max_2h", "agg": "max", "column": "amount", "window_seconds": 7200},
    {"name": "user_amount_mean_30d", "agg": "mean", "column": "amount", "window_seconds": 30 * 86400},
]


def test_a_second_view_is_computed_from_the_same_stream_state_as_offline(
    fs: FeatureSet, events: pd.DataFrame
) -> None:
    """A state that serves the card view and a second view with other (and longer) windows keeps
    the longest window of both; the second view's features, answered per event and looked up
    from that one state, equal its offline computation over the same events, and the first
    view's still do too."""
    from mlops.settings import WindowFeature

    other = fs.with_windows(WindowFeature.model_validate(w, strict=False) for w in OTHER_VIEW)
    assert other.digest() != fs.digest()
    spread = events.assign(
        event_time=events["event_time"] + pd.to_timedelta(np.arange(len(events)) % 9, unit="D")
    )
    spread = spread.sort_values("event_time", kind="stable").reset_index(drop=True)
    state = StreamFeatures(fs, extra_views=[other])
    ts = timestamps_ns(spread["event_time"])
    per_event = [
        state.update(u, int(t), {"amount": a}, other).features
        for u, t, a in zip(spread["user_id"], ts, spread["amount"], strict=True)
    ]
    offline = compute_offline(other, spread).to_pandas()
    for name in other.names:
        got = np.array([f[name] for f in per_event])
        diff = np.abs(got - offline[name].to_numpy()).max()
        assert diff == 0 if name.startswith("user_txn_count") else diff < 1e-9, (name, diff)
    users = spread["user_id"].drop_duplicates().head(200)
    at = pd.Timestamp(spread["event_time"].max()) + pd.Timedelta(seconds=1)
    rows = pd.DataFrame({"user_id": users, "event_time": [at] * len(users)})
    for view in (other, fs):
        expected = compute_offline(view, spread, rows).to_pandas()
        looked = pd.DataFrame([state.lookup(u, int(at.value), view) for u in users])
        np.testing.assert_allclose(
            looked[list(view.names)], expected[list(view.names)], rtol=1e-12, atol=1e-9
        )
    # The 30-day window outlives the card view's 7 days: a state serving one view only would have pruned it.
    assert StreamFeatures(fs)._keep_ns < state._keep_ns
    restored = StreamFeatures.from_table(fs, state.to_table(), [other])
    assert restored.lookup(users.iloc[0], int(at.value), other) == state.lookup(
        users.iloc[0], int(at.value), other
    )
    with pytest.raises(StateMismatch, match="rebuild it from the events"):
        StreamFeatures.from_table(fs, state.to_table())


def test_a_model_is_refused_unless_its_feature_view_is_declared(fs: FeatureSet) -> None:
    """``check_view`` returns the declared view a model was trained on (None for a model without
    window features) and refuses any other view in one line naming both digests."""
    from mlops.features import FeatureViewMismatch, check_view, model_view
    from mlops.settings import WindowFeature

    other = fs.with_windows(WindowFeature.model_validate(w, strict=False) for w in OTHER_VIEW)
    assert check_view(fs, None) is None
    assert model_view({"decision_threshold": "0.2"}) is None
    trained_on = model_view(other.lineage_tags())
    assert trained_on is not None and trained_on.names == other.names
    assert check_view([fs, other], trained_on) == other
    with pytest.raises(FeatureViewMismatch) as info:
        check_view(fs, trained_on, "fraud-detector v3")
    message = str(info.value)
    assert "\n" not in message and fs.digest() in message and other.digest() in message
    assert message.startswith("fraud-detector v3 was trained on feature view")
    with pytest.raises(FeatureViewMismatch, match="declares none"):
        check_view(None, trained_on)


def test_extra_views_are_validated_like_the_windows() -> None:
    """An extra view must name numeric dataset columns, and needs the current view declared."""
    with pytest.raises(ConfigError, match=r"extra_views\.0\.windows: x: 'channel' is not a numeric"):
        load_settings(
            environ={
                "MLOPS__FEATURES__WINDOWS": "[{name: n, agg: count, window_seconds: 5}]",
                "MLOPS__FEATURES__EXTRA_VIEWS": "[{windows: [{name: x, agg: max, column: channel, window_seconds: 5}]}]",
            }
        )
    with pytest.raises(ConfigError, match="declare the current view"):
        load_settings(
            environ={
                "MLOPS__FEATURES__EXTRA_VIEWS": "[{windows: [{name: n, agg: count, window_seconds: 5}]}]"
            }
        )
