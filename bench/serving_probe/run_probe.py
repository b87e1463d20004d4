"""Start one server variant on a free loopback port, load it, stop it, print results.

  python run_probe.py minimal --duration 10
  python run_probe.py bento --kind asgi --cfg '{"workers": 2}' --duration 10 --gc freeze

Each run: the async raw client (c), optionally the aiohttp client, the sequential
client and wrk (c, -t1) when installed. One JSON line per run is appended to
bench/out/serving_probe/results.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import run_async, run_sync  # noqa: E402
from model import build_model, model_path, sample_payload  # noqa: E402

OUT = HERE.parents[0] / "out" / "serving_probe"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(target: str, port: int, env_extra: dict[str, str], log: Path):
    env = {**os.environ, "PROBE_MODEL": str(model_path()), **env_extra}
    if target == "minimal":
        cmd = [
            PY,
            "-m",
            "uvicorn",
            "minimal_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    else:
        cmd = [
            PY,
            "-m",
            "bentoml",
            "serve",
            "bento_service:Probe",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    body = json.dumps(sample_payload()).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("server not ready")


def run_wrk(port: int, concurrency: int, duration: int, threads: int = 1) -> dict | None:
    if not shutil.which("wrk"):
        return None
    env = {**os.environ, "WRK_BODY": json.dumps(sample_payload())}
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "-s",
            str(HERE / "post.lua"),
            f"http://127.0.0.1:{port}/predict",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = json.loads(out.strip().splitlines()[-1])
    secs = stats["duration_us"] / 1e6
    return {
        "name": f"wrk c={concurrency}",
        "requests": stats["requests"],
        "rps": round(stats["requests"] / secs, 1),
        "p50_ms": stats["p50_us"] / 1e3,
        "p99_ms": stats["p99_us"] / 1e3,
        "max_ms": stats["max_us"] / 1e3,
        "stalls": stats["stalls"],
        "mean_ms": round(stats["mean_us"] / 1e3, 3),
        "busy_fraction": round(stats["requests"] * stats["mean_us"] / 1e6 / (secs * concurrency), 3),
        "errors": sum(v for k, v in stats.items() if k.startswith("err_")),
    }


def fmt(d: dict) -> str:
    extra = f"  busy {d['busy_fraction']:.2f}" if "busy_fraction" in d else ""
    return (
        f"  {d['name']:20s} {d['rps']:8.1f} rps  p50 {d['p50_ms']:7.3f}  p99 "
        f"{d['p99_ms']:7.3f}  max {d['max_ms']:8.2f} ms  stalls {d['stalls']:4d}  "
        f"err {d['errors']}{extra}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", choices=["minimal", "bento"])
    ap.add_argument("--kind", default="typed")
    ap.add_argument("--cfg", default="{}")
    ap.add_argument("--gc", default="")
    ap.add_argument("--label", default="")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--clients", default="raw,seq,wrk", help="comma list of raw,aiohttp,seq,wrk")
    ap.add_argument("--wrk-c1", action="store_true", help="also run wrk at c=1")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    if not model_path().exists():
        build_model(model_path())
    label = args.label or (
        args.target if args.target == "minimal" else f"bento {args.kind} {args.cfg} gc={args.gc or 'default'}"
    )
    env = {"PROBE_KIND": args.kind, "PROBE_CFG": args.cfg, "PROBE_GC": args.gc}
    port = free_port()
    payload = sample_payload()
    clients = args.clients.split(",")
    rows = []
    with server(args.target, port, env, OUT / "server.log"):
        for client in ("raw", "aiohttp"):
            if client in clients:
                r = asyncio.run(
                    run_async(
                        "127.0.0.1",
                        port,
                        "/predict",
                        payload,
                        concurrency=args.concurrency,
                        duration_s=args.duration,
                        client=client,
                    )
                )
                d = r.summary()
                d["stall_offsets_s"] = r.stall_offsets_s[:20]
                rows.append(d)
        if "seq" in clients:
            r = run_sync("127.0.0.1", port, "/predict", payload, duration_s=args.duration)
            d = r.summary()
            d["stall_offsets_s"] = r.stall_offsets_s[:20]
            rows.append(d)
        if "wrk" in clients:
            w = run_wrk(port, args.concurrency, args.duration)
            if w:
                rows.append(w)
            if args.wrk_c1:
                w = run_wrk(port, 1, args.duration)
                if w:
                    rows.append(w)
    print(label)
    for d in rows:
        print(fmt(d))
        if d.get("stall_offsets_s"):
            print("    stalls at s:", d["stall_offsets_s"])
    with open(OUT / "results.jsonl", "a") as fh:
        fh.write(
            json.dumps({"label": label, "duration": args.duration, "rows": rows, "time": time.time()}) + "\n"
        )


if __name__ == "__main__":
    main()
