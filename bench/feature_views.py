"""Online lookups of two feature views: what a canary from a model on one view to a model on
another costs the service's window-feature fill.

    .venv/bin/python -m bench.feature_views --events 20000 --rows 32 --requests 3000
    .venv/bin/python -m bench.feature_views --redis-url redis://127.0.0.1:6379/0

The stream's state (``StreamFeatures`` over the card view of ``configs/features.yaml`` and a
second view ``VIEW_B``, one name shared under the same definition) is checkpointed in a
temporary MLOPS_HOME (or under a scratch Redis prefix, deleted after). Then
``OnlineFeatures.fill`` fills ``--rows`` raw rows a request, ``--requests`` times, for:

  (a) view A only (a single-view service);
  (b) views A and B as two fills, one read each (a lookup per view);
  (c) views A and B in one fill: one read, each entity's window answered for both views.

It prints CPU microseconds a request (process time, so other load on the machine counts
less) for each and the ratios c/a and c/b.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # run by path: no shadowing
sys.path.insert(0, str(REPO))

from adapters.feature_store import RedisFeatureStore, state_store  # noqa: E402
from mlops.datagen import generate  # noqa: E402
from mlops.features import StreamFeatures, feature_views, timestamps_ns  # noqa: E402
from mlops.settings import load_settings  # noqa: E402
from serving.online_features import OnlineFeatures  # noqa: E402

CONFIG = REPO / "configs" / "features.yaml"
VIEW_B = [
    {"name": "user_txn_count_24h", "agg": "count", "window_seconds": 86400},
    {"name": "user_txn_count_2h", "agg": "count", "window_seconds": 7200},
    {"name": "user_amount_max_2h", "agg": "max", "column": "amount", "window_seconds": 7200},
    {"name": "user_amount_sum_3d", "agg": "sum", "column": "amount", "window_seconds": 3 * 86400},
]


async def _measure(online: OnlineFeatures, users: list[str], ts: int, requests: int) -> dict[str, float]:
    a, b = online.views
    both = tuple(dict.fromkeys(a.names + b.names))
    times = [ts] * len(users)

    async def fill(views, needed) -> None:
        await online.fill([{} for _ in users], users, times, needed, str, views)

    async def one_view() -> None:
        await fill((a,), a.names)

    async def a_read_each() -> None:
        await fill((a,), a.names)
        await fill((b,), b.names)

    async def one_read() -> None:
        await fill((a, b), both)

    cases = {"a": one_view, "b": a_read_each, "c": one_read}
    out = {}
    for key, call in cases.items():
        for _ in range(min(50, requests)):  # warm: entity windows indexed, connections open
            await call()
        started = time.process_time()
        for _ in range(requests):
            await call()
        out[key] = (time.process_time() - started) / requests * 1e6
    return out


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=32, help="rows a request")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--redis-url", default=None, help="use a Redis store at this URL (scratch prefix)")
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="bench-views-")
    env = {"MLOPS_HOME": home, "MLOPS__FEATURES__EXTRA_VIEWS": json.dumps([{"windows": VIEW_B}])}
    if args.redis_url:
        env["MLOPS__FEATURES__STORE"] = f"{{kind: redis, url: '{args.redis_url}', prefix: 'bench-views'}}"
    settings = load_settings(CONFIG, environ=env)
    first, second = feature_views(settings)
    events = generate(args.events, seed=1).sort_values("event_time", kind="stable").reset_index(drop=True)
    state = StreamFeatures(first, [second])
    state.replay(events["user_id"], timestamps_ns(events["event_time"]), {"amount": events["amount"]})
    cfg = settings.serving.online_features
    store = state_store(settings, first, cfg.topic, cfg.group)
    store.save(state, {cfg.topic: len(events)})
    users = [str(u) for u in events["user_id"].unique()[: args.rows]]
    assert state.max_ts is not None

    async def run() -> dict[str, float]:
        online = OnlineFeatures.for_settings(settings)
        assert online is not None
        print(f"store: {online.prepare()}")
        try:
            return await _measure(online, users, state.max_ts + 1_000_000_000, args.requests)
        finally:
            await online.stop()

    try:
        got = asyncio.run(run())
    finally:
        if isinstance(store, RedisFeatureStore):
            store.clear()
    print(f"{args.rows} rows a request, {args.requests} requests, CPU us a request:")
    print(f"  (a) view A only            {got['a']:8.0f}")
    print(f"  (b) A and B, a read each   {got['b']:8.0f}")
    print(f"  (c) A and B, one read      {got['c']:8.0f}")
    print(f"  c/a {got['c'] / got['a']:.2f}   c/b {got['c'] / got['b']:.2f}")


if __name__ == "__main__":
    main()
