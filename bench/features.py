"""Window-feature benchmark: the offline computation against pandas' rolling windows, and the stream.

    .venv/bin/python bench/features.py --rows 1000000

On the same generated card transactions (``user_id``, ``event_time``, ``amount``) and the
feature declarations of ``configs/features.yaml``:

  (a) ``compute_offline``: all declared features of every event, point-in-time;
  (b) baseline: pandas ``groupby(user).rolling(window, closed="left")`` for the count, sum,
      mean and max features only (pandas has no "last value" or "seconds since" rolling
      aggregate), on a frame already sorted by user and time (sorting is not timed);
  (c) ``StreamFeatures.update`` event by event over the first ``--stream-rows`` events.

It prints the seconds and rows/s of each, the ratio b/a, and the largest difference
between (a) and (b) on the features both compute.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mlops.datagen import generate
from mlops.features import FeatureSet, StreamFeatures, compute_offline, timestamps_ns
from mlops.settings import load_settings

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "features.yaml"


def _pandas_baseline(fs: FeatureSet, df: pd.DataFrame) -> tuple[float, dict[str, np.ndarray]]:
    srt = df.sort_values(["user_id", "event_time"], kind="stable")
    t = time.perf_counter()
    out: dict[str, np.ndarray] = {}
    grouped = srt.groupby("user_id", sort=False)
    for w in fs.windows:
        if w.agg not in ("count", "sum", "mean", "max"):
            continue
        roll = grouped.rolling(f"{int(w.window_seconds)}s", on="event_time", closed="left")["amount"]
        res = getattr(roll, w.agg)()
        # groupby(sort=False).rolling answers group by group in the frame's (user, time) order
        assert (res.index.get_level_values(0) == srt["user_id"].to_numpy()).all()
        vals, rows = res.to_numpy(), srt.index.to_numpy()
        if w.agg in ("count", "sum"):
            vals = np.nan_to_num(vals, nan=0.0)
        else:
            vals = np.where(np.isnan(vals), w.empty_value, vals)
        back = np.empty(len(srt))
        back[rows] = vals  # the frame's index is 0..n-1
        out[w.name] = back
    return time.perf_counter() - t, out


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stream-rows", type=int, default=100_000)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    fs = FeatureSet.from_settings(load_settings(CONFIG, environ={}))
    df = generate(args.rows, seed=1)[["user_id", "event_time", "amount"]]
    users = df["user_id"].nunique()
    print(f"{args.rows:,} events, {users:,} users, {len(fs.names)} features: {', '.join(fs.names)}")

    compute_offline(fs, df.head(10_000))  # warm-up (imports, first allocations)
    t = time.perf_counter()
    offline = compute_offline(fs, df)
    a = time.perf_counter() - t
    print(f"(a) compute_offline: {a:.2f} s, {args.rows / a:,.0f} rows/s")

    if not args.no_baseline:
        b, base = _pandas_baseline(fs, df)
        worst = {n: float(np.abs(base[n] - offline.column(n).to_numpy()).max()) for n in base}
        print(f"(b) pandas rolling ({len(base)} of the features): {b:.2f} s, {args.rows / b:,.0f} rows/s")
        print(f"    ratio b/a = {b / a:.1f}x; max abs diff (a) vs (b): {worst}")

    n = min(args.stream_rows, args.rows)
    order = np.argsort(df["event_time"].to_numpy(), kind="stable")[:n]
    ents = df["user_id"].to_numpy()[order]
    ts = timestamps_ns(df["event_time"])[order]
    amounts = df["amount"].to_numpy()[order]
    state = StreamFeatures(fs)
    t = time.perf_counter()
    for i in range(n):
        state.update(ents[i], int(ts[i]), {"amount": float(amounts[i])})
    c = time.perf_counter() - t
    print(
        f"(c) stream update: {n:,} events in {c:.2f} s, {n / c:,.0f} events/s, "
        f"{c / n * 1e6:.1f} us/event; state holds {state.retained_events:,} events of {state.entities:,} users"
    )


if __name__ == "__main__":
    main()
