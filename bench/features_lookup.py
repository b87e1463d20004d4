"""Online feature lookup benchmark: what filling the window features from the store adds to /predict.

One run trains a small model whose inputs include the seven window features of
configs/features.yaml, publishes the window state of 20,000 generated events the way the
stream does (``StreamFeatures`` + the store's ``save``) to the embedded checkpoint file and to
a real redis-server, and starts two real services (``bentoml serve``), one per store. Each
service is loaded at the same concurrency with two bodies: the transaction with every feature
sent (no store read) and the raw transaction (dataset fields, user id, event time) whose
window features the service looks up. The four targets are loaded in alternation
(``--rounds`` windows each, order rotating), with bench/serving.py's load generators
(asyncio keep-alive connections, and wrk when installed). It prints p50/p99 per target and,
per store, the p99 the lookup adds (raw - sent, in ms) and the ratio raw/sent. Goal: <= 2 ms
added p99 at concurrency 8.

    python bench/features_lookup.py --duration 40 --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


from bench import serving as bench  # noqa: E402  (the serving benchmark's load generators and servers)

FEATURES_YAML = REPO / "configs" / "features.yaml"
EVENTS = 20_000
TOPIC, GROUP = "transactions", "scorer"


def prepare(home: Path) -> tuple[dict, dict, tuple]:
    """Train and register the window model in ``home``; the (sent, raw) request bodies and the
    events' (user, time ns, amount) columns."""
    import pandas as pd

    from adapters.runtime import configure
    from bench.support import log_onnx_model
    from mlops import modeling
    from mlops.datagen import generate
    from mlops.features import FeatureSet, compute_offline, timestamps_ns
    from mlops.settings import LogisticRegressionSpec, NumericFeature, load_settings
    from registry.mlflow_registry import ModelRegistry

    settings = load_settings(FEATURES_YAML, environ={"MLOPS_HOME": str(home)})
    configure(settings)
    fs = FeatureSet.from_settings(settings)
    ds = settings.dataset
    events = generate(EVENTS, seed=7).sort_values("event_time", kind="stable").reset_index(drop=True)
    offline = compute_offline(fs, events).to_pandas()
    wide = ds.model_copy(update={"numeric": ds.numeric + tuple(NumericFeature(name=n) for n in fs.names)})
    frame = pd.concat([events, offline], axis=1)
    pipe = modeling.fit(LogisticRegressionSpec(max_iter=300), frame, wide, 0)
    logged = log_onnx_model(settings, modeling.to_onnx_bytes(pipe, wide), "bench-features-lookup")
    registry = ModelRegistry(settings)
    name = settings.training.model_name
    version = registry.register(name, logged.model_uri, logged.run_id, {}, "lookup benchmark").version
    registry.move_alias(name, "champion", version, reason="lookup benchmark")

    user = events["user_id"].value_counts().index[0]  # the busiest user: the largest window to read
    at = events["event_time"].iloc[-1] + pd.Timedelta(seconds=1)
    row = events.iloc[-1]
    dataset = {n: float(row[n]) for n in ds.numeric_names} | {n: str(row[n]) for n in ds.categorical_names}
    query = pd.DataFrame({"user_id": [user], "event_time": [at]})
    feats = compute_offline(fs, events, query).to_pandas().iloc[0].to_dict()
    print(f"{EVENTS:,} events; user {user}: {int(feats['user_txn_count_24h'])} events in 24 h", flush=True)
    sent = {"features": dataset | {k: float(v) for k, v in feats.items()}}
    raw = {"features": dataset | {"user_id": user, "event_time": at.isoformat()}}
    return sent, raw, (events["user_id"], timestamps_ns(events["event_time"]), events["amount"])


def publish(home: Path, redis_url: str, columns: tuple) -> None:
    """The window state of every event, checkpointed to the embedded file and to Redis."""
    from adapters.feature_store import state_store
    from mlops.features import FeatureSet, StreamFeatures
    from mlops.settings import load_settings

    for env in ({}, {"MLOPS__FEATURES__STORE": f"{{kind: redis, url: '{redis_url}'}}"}):
        settings = load_settings(FEATURES_YAML, environ={"MLOPS_HOME": str(home), **env})
        fs = FeatureSet.from_settings(settings)
        state = StreamFeatures(fs)
        users, ts, amounts = columns
        state.replay(users, ts, {"amount": amounts})
        state_store(settings, fs, TOPIC, GROUP).save(state, {TOPIC: len(ts)})


@contextlib.contextmanager
def redis_server(folder: Path):
    """A redis-server on a free loopback port (as `mlops server up` starts it); its URL."""
    from adapters.broker_redis import redis_ready, redis_server_command
    from adapters.services import free_port, started

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = redis_server_command("127.0.0.1", port, folder, "everysec")
    with started(
        argv, lambda: redis_ready(url), folder / "redis.log", timeout=20, name="redis-server"
    ) as proc:
        yield url, proc.pid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per target and client")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="alternating windows per target")
    ap.add_argument("--clients", default="async,wrk", help="comma-separated subset of async, wrk, seq")
    ap.add_argument("--stall-ms", type=float, default=50.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    if "wrk" in clients and not shutil.which("wrk"):
        print("wrk not found: skipping the wrk client (apt-get install wrk)")
        clients.remove("wrk")
    window = args.duration / args.rounds
    stores = ("embedded", "redis")
    targets = [f"{kind}:{body}" for kind in stores for body in ("sent", "raw")]
    from adapters.services import free_port

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp_dir:
        tmp = Path(tmp_dir)
        home = tmp / "home"
        print("training a window-feature model on generated events ...", flush=True)
        sent, raw, columns = prepare(home)
        bodies = {"sent": sent, "raw": raw}
        lua = tmp / "post.lua"
        lua.write_text(bench._WRK_LUA)
        (tmp / "redis").mkdir()
        with redis_server(tmp / "redis") as (redis_url, redis_pid), contextlib.ExitStack() as stack:
            publish(home, redis_url, columns)
            ports = {kind: free_port() for kind in stores}
            envs = {
                "embedded": {},
                "redis": {"MLOPS__FEATURES__STORE": f"{{kind: redis, url: '{redis_url}'}}"},
            }
            procs = {
                kind: stack.enter_context(
                    bench._server(
                        bench.service_command(ports[kind]),
                        REPO,
                        {
                            "MLOPS_HOME": str(home),
                            "MLOPS_CONFIG": str(FEATURES_YAML),
                            **bench.SERVICE_ENV,
                            **envs[kind],
                        },
                        ports[kind],
                        tmp / f"{kind}.log",
                        raw,
                    )
                )
                for kind in stores
            }
            roots = {p.pid for p in procs.values()} | {redis_pid}
            pooled: dict[str, dict[str, list]] = {c: {t: [] for t in targets} for c in clients}
            ticks = {c: {t: [0, 0] for t in targets} for c in clients}  # service tree, redis-server
            foreign: dict[str, dict[str, list[float]]] = {c: {t: [] for t in targets} for c in clients}
            for rnd in range(args.rounds):
                order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                for client in clients:
                    for target in order:
                        kind, body = target.split(":")
                        before = (bench._tree_ticks({procs[kind].pid}), bench._tree_ticks({redis_pid}))
                        with bench.foreign_cpu(roots, foreign[client][target]):
                            run = bench.measure(
                                client,
                                ports[kind],
                                bodies[body],
                                args.concurrency,
                                window,
                                args.stall_ms,
                                lua,
                            )
                        ticks[client][target][0] += bench._tree_ticks({procs[kind].pid}) - before[0]
                        ticks[client][target][1] += bench._tree_ticks({redis_pid}) - before[1]
                        pooled[client][target].append(run)
                print(f"round {rnd + 1}/{args.rounds} done", flush=True)

    results = {c: {t: bench._pool(c, pooled[c][t], args.stall_ms) for t in targets} for c in clients}
    for c in clients:
        for t in targets:
            n = max(results[c][t]["requests"], 1)
            results[c][t]["service_cpu_ms_per_req"] = ticks[c][t][0] / bench._TICK * 1e3 / n
            results[c][t]["redis_cpu_ms_per_req"] = ticks[c][t][1] / bench._TICK * 1e3 / n
    print(
        f"\nconcurrency {args.concurrency}, {args.rounds} rounds x {window:.1f}s per target and client; "
        "wrk p99 is the worst window's"
    )
    print(
        f"{'client':7s} {'target':14s} {'rps':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} "
        f"{'errors':>6s} {'foreign cores':>13s} {'cpu ms/req':>10s} {'redis cpu':>9s}"
    )
    summary = {}
    for client in clients:
        for t in targets:
            s = results[client][t]
            print(
                f"{client:7s} {t:14s} {s['rps']:8.1f} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.1f} "
                f"{s['errors']:6d} {statistics.mean(foreign[client][t]):13.2f} "
                f"{s['service_cpu_ms_per_req']:10.3f} {s['redis_cpu_ms_per_req']:9.3f}"
            )
        for kind in stores:
            a, b = results[client][f"{kind}:sent"], results[client][f"{kind}:raw"]
            added = b["p99_ms"] - a["p99_ms"]
            summary[f"{client}:{kind}"] = {"added_p99_ms": added, "p99_ratio": b["p99_ms"] / a["p99_ms"]}
            print(
                f"{client:7s} {kind} lookup: p99 +{added:.2f} ms (raw/sent {b['p99_ms'] / a['p99_ms']:.2f}), "
                f"p50 +{b['p50_ms'] - a['p50_ms']:.2f} ms, rps raw/sent {b['rps'] / a['rps']:.2f}, "
                f"service cpu/req +{b['service_cpu_ms_per_req'] - a['service_cpu_ms_per_req']:.3f} ms"
                f"  goal <= 2 ms: {'met' if added <= 2.0 else 'NOT met'}"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "summary": summary, "foreign": foreign}, indent=2)
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    raise SystemExit(main())
