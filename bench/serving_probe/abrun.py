"""Interleaved A/B runs: the minimal app and one BentoML variant, loaded in alternation.

Other work shares this 2-core machine, so one long run of each server would compare two
different machines. Instead both servers stay up and each round loads the minimal app and
then the variant (order alternating per round) for ``--window`` seconds with each client;
every window records the CPU used by processes outside ours ("foreign" cores). Results:
pooled latencies per target and client, and the median of per-round RPS ratios.

  python abrun.py --kind asgi --cfg '{"workers": 1}' --rounds 4 --window 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpuwatch import ForeignCpu  # noqa: E402
from loadgen import Result, run_async, run_sync  # noqa: E402
from model import build_model, model_path, sample_payload  # noqa: E402
from run_probe import OUT, free_port, run_wrk, server  # noqa: E402


def one_window(client: str, port: int, window: int, concurrency: int, roots: set[int]):
    payload = sample_payload()
    watch = ForeignCpu(roots)
    watch.start()
    if client == "raw" or client == "aiohttp":
        r = asyncio.run(
            run_async(
                "127.0.0.1",
                port,
                "/predict",
                payload,
                concurrency=concurrency,
                duration_s=window,
                client=client,
                warmup_s=0.5,
            )
        )
    elif client == "seq":
        r = run_sync("127.0.0.1", port, "/predict", payload, duration_s=window)
    elif client == "wrk":
        r = run_wrk(port, concurrency, window)
    else:
        raise ValueError(client)
    return r, watch.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="typed")
    ap.add_argument("--cfg", default="{}")
    ap.add_argument("--gc", default="")
    ap.add_argument("--env", default="{}", help="extra env JSON for the bento server")
    ap.add_argument("--label", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--clients", default="raw,wrk,seq")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not model_path().exists():
        build_model(model_path())
    label = args.label or f"{args.kind} {args.cfg} gc={args.gc or '-'} env={args.env}"
    env = {"PROBE_KIND": args.kind, "PROBE_CFG": args.cfg, "PROBE_GC": args.gc, **json.loads(args.env)}
    clients = args.clients.split(",")
    pm, pb = free_port(), free_port()
    pooled: dict[tuple[str, str], list] = {}
    foreign: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {c: [] for c in clients}
    with contextlib.ExitStack() as stack:
        m = stack.enter_context(server("minimal", pm, {}, OUT / "minimal.log"))
        b = stack.enter_context(server("bento", pb, env, OUT / "bento.log"))
        roots = {m.pid, b.pid}
        for rnd in range(args.rounds):
            order = [("minimal", pm), ("bento", pb)]
            if rnd % 2:
                order.reverse()
            for client in clients:
                rps = {}
                for target, port in order:
                    r, cpu = one_window(client, port, args.window, args.concurrency, roots)
                    if r is None:
                        continue
                    pooled.setdefault((target, client), []).append(r)
                    foreign.setdefault((target, client), []).append(cpu["foreign_cores"])
                    rps[target] = r.rps if isinstance(r, Result) else r["rps"]
                if len(rps) == 2:
                    ratios[client].append(rps["bento"] / rps["minimal"])
    print(f"== {label}  ({args.rounds} rounds x {args.window}s, c={args.concurrency})")
    record = {"label": label, "time": time.time(), "rounds": args.rounds, "window": args.window, "rows": []}
    for client in clients:
        for target in ("minimal", "bento"):
            rs = pooled.get((target, client))
            if not rs:
                continue
            if isinstance(rs[0], Result):
                lat = np.concatenate([r.latencies_ns for r in rs])
                dur = sum(r.duration_s for r in rs)
                p = Result(f"{target} {client}", dur, lat)
                row = p.summary()
            else:  # wrk dicts: pool what can be pooled
                secs = [r["requests"] / r["rps"] for r in rs]
                row = {
                    "name": f"{target} {client}",
                    "requests": sum(r["requests"] for r in rs),
                    "rps": round(sum(r["requests"] for r in rs) / sum(secs), 1),
                    "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 3),
                    "p99_ms": round(max(r["p99_ms"] for r in rs), 3),
                    "max_ms": max(r["max_ms"] for r in rs),
                    "stalls": sum(r["stalls"] for r in rs),
                    "errors": sum(r["errors"] for r in rs),
                }
            row["foreign_cores"] = round(statistics.mean(foreign[(target, client)]), 2)
            record["rows"].append(row)
            print(
                f"  {row['name']:16s} {row['rps']:8.1f} rps  p50 {row['p50_ms']:7.3f}  "
                f"p99 {row['p99_ms']:7.3f}  max {row['max_ms']:8.2f} ms  stalls "
                f"{row['stalls']:4d}  err {row['errors']}  foreign {row['foreign_cores']:.2f}"
            )
        if ratios[client]:
            med = statistics.median(ratios[client])
            record.setdefault("ratio", {})[client] = [round(x, 3) for x in ratios[client]]
            print(
                f"  -> {client}: bento/minimal RPS median {med:.3f}  rounds "
                f"{[round(x, 2) for x in ratios[client]]}"
            )
    with open(OUT / "ab_results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
