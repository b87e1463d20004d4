"""Stream benchmark: the full consumer against a minimal one, and event -> prediction latency.

    .venv/bin/python bench/stream.py --events 200000 --broker embedded
    .venv/bin/python bench/stream.py --events 200000 --broker redis --redis-url redis://127.0.0.1:6390/0
    .venv/bin/python bench/stream.py --kill-events 1000000 --kills 10   # the exactly-once run at 1M
    .venv/bin/python bench/stream.py --events 200000 --route single canary shadow --route-pct 10

On generated card transactions and the features of ``configs/features.yaml``, same model, same
broker, same machine, measured interleaved (``--rounds`` alternations, best of each):

  (a) the full ``StreamConsumer``: window features, ONNX Runtime, Parquet part (fsync), commit;
  (b) minimal: poll the broker, build the model's float32 input from the payloads, run raw ORT,
      commit; no features, no output.

With ``--route single canary shadow`` the full consumer is measured once per route in each
round, interleaved; a routed one also pins a candidate (a second logistic regression) and
routes each event (canary: ``--route-pct`` of entities answered by the candidate; shadow:
that share of events also scored by it). It also prints each route's throughput over single's.

It prints events/s of each and the ratio a/b (goal >= 0.5), then the end-to-end latency
(publish -> committed prediction) at ``--rate`` events/s offered load: p50/p99 (goal p99 <= 250 ms).
With ``--kill-events`` it instead runs the SIGKILL acceptance (the test's procedure) at that size.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.broker import SqliteBroker
from adapters.feature_store import EmbeddedFeatureStore
from mlops.datagen import generate
from mlops.features import FeatureSet
from mlops.modeling import fit, to_onnx_bytes
from mlops.onnx_model import OnnxScorer
from mlops.routing import RouteTable
from mlops.scoring import ModelRef
from mlops.settings import LogisticRegressionSpec, load_settings
from tasks.stream import StreamConsumer, frame_messages, read_parts

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "features.yaml"


def _broker(kind: str, home: Path, url: str | None):
    if kind == "redis":
        from adapters.broker_redis import RedisBroker

        return RedisBroker.from_url(url, prefix=f"bench:{home.name}:{time.time_ns()}")
    return SqliteBroker(home / "broker.db")


def _routes(kind: str, pct: float) -> RouteTable:
    if kind == "canary":
        return RouteTable(mode="canary", weight_pct=pct, salt="bench")
    if kind == "shadow":
        return RouteTable(mode="shadow", mirror_pct=pct, salt="bench")
    return RouteTable()


def _consumer(
    settings,
    fs,
    onnx: bytes,
    broker,
    home: Path,
    group: str = "scorer",
    routes: RouteTable | None = None,
    candidate: bytes | None = None,
) -> StreamConsumer:
    cand = (
        (OnnxScorer(candidate, settings.dataset), ModelRef("fraud-detector", 2, "challenger", 0.3, "c"))
        if candidate is not None
        else None
    )
    return StreamConsumer(
        broker=broker,
        store=EmbeddedFeatureStore(home / "state", fs),
        fs=fs,
        schema=settings.dataset,
        scorer=OnnxScorer(onnx, settings.dataset),
        model=ModelRef("fraud-detector", 1, "champion", 0.2, hashlib.sha256(onnx).hexdigest()[:16]),
        out_dir=home / "out",
        topic="tx",
        group=group,
        checkpoint_every=10,
        routes=routes,
        candidate=cand,
    )


def full(settings, fs, onnx, broker, home: Path, batch: int, routes=None, candidate=None) -> float:
    """Events/s of the full consumer over the whole topic (routed when ``routes`` and ``candidate``)."""
    c = _consumer(
        settings, fs, onnx, broker, home, group=f"full-{home.name}", routes=routes, candidate=candidate
    )
    c.start()
    t = time.perf_counter()
    n = sum(r.rows for r in c.run(10**12, batch))
    return n / (time.perf_counter() - t)


def minimal(settings, onnx: bytes, broker, batch: int) -> float:
    """Events/s of a consumer that only polls, builds the model input and runs raw ORT, then commits."""
    scorer = OnnxScorer(onnx, settings.dataset)
    names = [i.name for i in scorer.session.get_inputs()]
    group, at, n = f"minimal{time.time_ns()}", 0, 0
    t = time.perf_counter()
    while True:
        msgs = broker.poll("tx", group, batch, start=at)
        if not msgs:
            break
        scorer.run(scorer.feeds({c: [m.payload[c] for m in msgs] for c in names}))
        at = msgs[-1].offset + 1
        broker.commit("tx", group, at)
        n += len(msgs)
    return n / (time.perf_counter() - t)


def latency(settings, fs, onnx, broker, home: Path, rate: float, seconds: float, events) -> np.ndarray:
    """Publish at ``rate`` events/s for ``seconds``; consume concurrently; publish -> committed latency."""
    c = _consumer(settings, fs, onnx, broker, home)
    c.start()
    msgs = list(frame_messages(events, settings.dataset, fs))
    total = min(len(msgs), int(rate * seconds))
    sent = np.zeros(total)
    done = np.zeros(total)
    tick = 0.02

    def produce() -> None:
        t0, i = time.perf_counter(), 0
        while i < total:
            due = min(total, int((time.perf_counter() - t0) * rate) + 1)
            if due > i:
                now = time.perf_counter()
                c.broker.publish("tx", msgs[i:due])
                sent[i:due] = now
                i = due
            time.sleep(tick / 4)

    prod = threading.Thread(target=produce)
    pub_broker = c.broker
    if isinstance(pub_broker, SqliteBroker):  # one connection per thread: its own handle
        c.broker = SqliteBroker(pub_broker.path)
    prod.start()
    got = 0
    while got < total:
        r = c.step(1000)
        if r is None:
            time.sleep(0.005)
            continue
        done[r.first : r.next_offset] = time.perf_counter()
        got = r.next_offset
    prod.join()
    return (done - sent) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--broker", choices=["embedded", "redis"], default="embedded")
    ap.add_argument("--redis-url")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--kill-events", type=int, default=0)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--kill-wait", type=float, default=20.0, help="Longest run before a kill (seconds).")
    ap.add_argument(
        "--route",
        nargs="+",
        choices=["single", "canary", "shadow"],
        default=["single"],
        help="Routes of the full consumer; several are measured interleaved in each round.",
    )
    ap.add_argument("--route-pct", type=float, default=10.0, help="canary weight / shadow mirror percent.")
    a = ap.parse_args()
    settings = load_settings(CONFIG, environ={})
    fs = FeatureSet.from_settings(settings)
    onnx = to_onnx_bytes(
        fit(LogisticRegressionSpec(), generate(5_000, seed=2), settings.dataset, seed=0), settings.dataset
    )
    candidate = None
    if set(a.route) - {"single"}:
        candidate = to_onnx_bytes(
            fit(LogisticRegressionSpec(), generate(5_000, seed=3), settings.dataset, seed=1), settings.dataset
        )
    root = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    if a.kill_events:
        _kill_run(a, settings, fs, onnx, root)
        return
    events = generate(a.events, seed=9).sort_values("event_time", kind="stable").reset_index(drop=True)
    home = root / "topic"
    broker = _broker(a.broker, home, a.redis_url)
    t = time.perf_counter()
    broker.publish("tx", frame_messages(events, settings.dataset, fs))
    print(f"published {a.events:,} events in {time.perf_counter() - t:.1f} s ({a.broker})")
    print(f"full consumer routes: {', '.join(a.route)} (canary weight / shadow mirror {a.route_pct}%)")
    fulls: dict[str, list[float]] = {kind: [] for kind in a.route}
    mins: list[float] = []
    for r in range(a.rounds):
        mins.append(minimal(settings, onnx, broker, a.batch))
        line = f"round {r}: minimal {mins[-1]:,.0f} ev/s"
        for kind in a.route:
            routes, cand = _routes(kind, a.route_pct), candidate if kind != "single" else None
            fulls[kind].append(full(settings, fs, onnx, broker, root / f"{kind}{r}", a.batch, routes, cand))
            line += f", {kind} {fulls[kind][-1]:,.0f} ev/s (ratio {fulls[kind][-1] / mins[-1]:.2f})"
        print(line)
    for kind, got in fulls.items():
        ratios = [f / m for f, m in zip(got, mins, strict=True)]
        print(
            f"throughput {kind}: full {max(got):,.0f} ev/s, minimal {max(mins):,.0f} ev/s (best of {a.rounds}), "
            f"ratio of bests {max(got) / max(mins):.2f}, median round ratio {float(np.median(ratios)):.2f}"
        )
    if "single" in fulls:
        for kind in (k for k in fulls if k != "single"):
            per_round = [x / s for x, s in zip(fulls[kind], fulls["single"], strict=True)]
            print(f"{kind} / single: median round ratio {float(np.median(per_round)):.2f}")
    lat = latency(
        settings,
        fs,
        onnx,
        _broker(a.broker, root / "lat", a.redis_url),
        root / "lat",
        a.rate,
        a.seconds,
        events,
    )
    print(
        f"latency at {a.rate:,.0f} ev/s for {a.seconds:.0f} s: p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms"
    )


def _kill_run(a, settings, fs, onnx: bytes, root: Path) -> None:
    from tests.support.stream import kill_and_resume

    events = generate(a.kill_events, seed=9).sort_values("event_time", kind="stable").reset_index(drop=True)
    model = root / "model.onnx"
    model.write_bytes(onnx)
    where = a.redis_url if a.broker == "redis" else "embedded"
    clean_home, home = root / "clean", root / "killed"
    clean = _consumer(settings, fs, onnx, _broker(a.broker, clean_home, a.redis_url), clean_home)
    clean.broker.publish("tx", frame_messages(events, settings.dataset, fs))
    clean.start()
    t = time.perf_counter()
    clean.run(10**12, 500)
    print(f"clean run: {a.kill_events:,} events in {time.perf_counter() - t:.0f} s")
    if a.broker == "redis":
        from adapters.broker_redis import RedisBroker

        RedisBroker.from_url(a.redis_url, prefix=home.name).publish(
            "tx", frame_messages(events, settings.dataset, fs)
        )
    else:
        SqliteBroker(home / "broker.db").publish("tx", frame_messages(events, settings.dataset, fs))
    t = time.perf_counter()
    kills = kill_and_resume(home, model, where, a.kills, seed=17, total=a.kill_events, max_wait=a.kill_wait)
    print(f"killed run: {kills} SIGKILLs, {time.perf_counter() - t:.0f} s")
    got, expected = read_parts(home / "out" / "scorer"), read_parts(clean_home / "out")
    same = got.equals(expected)
    print(f"rows {got.num_rows:,} (events {a.kill_events:,}); identical to the clean run: {same}")
    if not same or got.num_rows != a.kill_events:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
