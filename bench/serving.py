"""Serving benchmark: the platform's BentoML service vs. a minimal Starlette + ONNX Runtime app.

One run starts, on this machine, the real online service (``serving.service:ScoringService``
under ``bentoml serve``, with its router, validation, prediction log and metrics) and a
minimal app that only parses the same JSON and scores the same ONNX model, then loads both
with the same single-row requests at the same concurrency and prints RPS, p50, p99, max and
stalls (requests slower than ``--stall-ms``) for each, plus the ratios. The service is also
measured in shadow mode (every request mirrored to a candidate) and canary mode (50 % of
users on the candidate) to price the router, and, as the multi-model target ``tenants``, on
the tenant route with every request sent to one of ``--tenant-models`` registered tenant
models (the champion's architecture with different weights per tenant, or the same ONNX
with ``--identical-tenants``; all loaded first) at random: warm p99 goal <= 1.2 x single-model. Goals (concurrency 8): RPS >= 0.5 x minimal,
p99 <= 3 x minimal, no stall over 50 ms in a 60 s run; shadow adds <= 10 % to p99; canary
costs <= 5 % RPS.

Model: with ``--home DIR`` the champion (and challenger, or the champion again, as the
candidate) of that MLOPS_HOME's registry; without it, a temporary home where the production
default (GradientBoosting, 100 trees) is trained on generated data and registered twice.

Other work may share the machine, so targets are loaded in alternation: the load is split
into ``--rounds`` windows per target and client, the order rotating each round, and each
window records how many cores processes outside the benchmark used ("foreign"). The server
CPU time per request (the server's process tree, from /proc) is printed too: under foreign
load it is the steadiest measure of what the service itself costs. Clients:
``async`` (asyncio keep-alive connections, every latency kept), ``wrk`` (when installed;
percentiles and stalls from its histogram), ``seq`` (one blocking connection, optional).

    python bench/serving.py --duration 60 --rounds 6          # 60 s of load per target and client

This file is also the minimal app (``uvicorn serving:minimal_app --factory`` with
``BENCH_MODEL`` pointing at the ONNX file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_ENV = "BENCH_MODEL"
PREDICT_PATH = "/predict"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # run by path: no shadowing
sys.path.insert(0, str(REPO))
TARGETS = ("minimal", "bentoml", "shadow", "canary", "tenants")

# --------------------------------------------------------------------------- minimal app


def minimal_app():
    """Baseline (uvicorn --factory): JSON in, the model's score out; no validation, routing or logging."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from mlops.datagen import fraud_schema
    from mlops.onnx_model import PROBA_OUTPUT, OnnxScorer

    schema = fraud_schema()
    scorer = OnnxScorer(Path(os.environ[MODEL_ENV]).read_bytes(), schema)
    names = schema.feature_names

    async def predict(request: Request) -> Response:
        features = json.loads(await request.body())["features"]
        feeds = scorer.feeds({n: [features[n]] for n in names})
        score = float(scorer.session.run([PROBA_OUTPUT], feeds)[0][0, 1])
        return Response(json.dumps({"score": score}), media_type="application/json")

    return Starlette(routes=[Route(PREDICT_PATH, predict, methods=["POST"])])


# --------------------------------------------------------------------------- model + home


def prepare_home(home: Path | None, tmp: Path) -> tuple[Path, int, int, Path]:
    """(MLOPS_HOME, stable version, candidate version, ONNX file of the stable version)."""
    from adapters.runtime import configure
    from mlops.settings import load_settings
    from registry.mlflow_registry import ModelRegistry

    env = {"MLOPS_HOME": str(home or tmp / "home")}
    settings = load_settings(environ=env)
    configure(settings)
    registry = ModelRegistry(settings)
    name = settings.training.model_name
    if home is None:
        print(
            "training the default GradientBoosting model on generated data (no --home given) ...", flush=True
        )
        _train_and_register(settings, registry)
    aliases = registry.aliases(name)
    if "champion" not in aliases:
        raise SystemExit(f"{settings.home_path}: '{name}' has no champion to serve")
    stable = aliases["champion"]
    candidate = aliases.get("challenger", stable)
    model = tmp / "model.onnx"
    model.write_bytes(registry.onnx_bytes(name, stable))
    return settings.home_path, stable, candidate, model


def _train_and_register(settings, registry) -> None:
    from bench.support import log_and_register
    from mlops import modeling
    from mlops.datagen import generate
    from mlops.settings import GradientBoostingSpec

    frame = generate(20_000, seed=5)
    pipe = modeling.fit(GradientBoostingSpec(), frame, settings.dataset, settings.training.seed)
    name = settings.training.model_name
    logged = log_and_register(settings, modeling.to_onnx_bytes(pipe, settings.dataset), [name])
    registry.register(name, logged.model_uri, logged.run_id, {}, "serving benchmark (candidate)")


def sample_payload(seed: int = 0) -> dict:
    from mlops.datagen import fraud_schema, generate

    schema = fraud_schema()
    row = generate(1, seed=seed).iloc[0]
    features = {n: float(row[n]) for n in schema.numeric_names} | {
        n: str(row[n]) for n in schema.categorical_names
    }
    return {"features": features, "entity_key": "user-42"}


# --------------------------------------------------------------------------- clients


@dataclass
class Run:
    """One client's pooled result against one target."""

    latencies_ns: np.ndarray
    seconds: float
    errors: int = 0

    def summary(self, stall_ms: float) -> dict[str, float]:
        lat = self.latencies_ns
        return {
            "requests": int(lat.size),
            "rps": lat.size / self.seconds,
            "p50_ms": float(np.percentile(lat, 50)) / 1e6,
            "p99_ms": float(np.percentile(lat, 99)) / 1e6,
            "max_ms": float(lat.max()) / 1e6,
            "stalls": int((lat > stall_ms * 1e6).sum()),
            "errors": self.errors,
        }


def _request_bytes(port: int, payload: dict, path: str = PREDICT_PATH, token: str | None = None) -> bytes:
    body = json.dumps(payload).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def register_tenants(home: Path, stable: int, n: int, identical: bool = False) -> dict[str, str]:
    """Register ``n`` tenant models ``<model>--tNNN`` (alias champion): the champion's
    architecture with different weights per tenant (``bench.support.weight_variants``), or
    with ``identical`` the champion's ONNX itself; and a tenant for each. {tenant predict
    path: tenant token}."""
    from bench.support import log_and_register, register_variants, weight_variants
    from mlops.settings import load_settings
    from mlops.tenancy import tenant_model_name
    from registry.mlflow_registry import ModelRegistry
    from serving.tenants import add_tenant

    settings = load_settings(environ={"MLOPS_HOME": str(home)})
    name = settings.training.model_name
    tenants = [f"t{i:03d}" for i in range(n)]
    onnx = ModelRegistry(settings).onnx_bytes(name, stable)
    names = [tenant_model_name(name, t) for t in tenants]
    if identical:
        log_and_register(settings, onnx, names)
    else:
        register_variants(settings, weight_variants(onnx, n, seed=1), names)
    return {f"/tenants/models/{tenant_model_name(name, t)}/predict": add_tenant(settings, t) for t in tenants}


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head[9:12])


async def _async_load(
    port: int, payload: dict, concurrency: int, seconds: float, tenants: dict[str, str] | None = None
) -> Run:
    """``concurrency`` keep-alive connections for ``seconds``; with ``tenants`` (path ->
    token) each request goes to a tenant model drawn at random."""
    import random

    requests = [_request_bytes(port, payload, p, t) for p, t in (tenants or {}).items()]
    request = _request_bytes(port, payload)
    lat: list[int] = []
    errors = 0

    async def connection(deadline: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter_ns() < deadline:
                start = time.perf_counter_ns()
                writer.write(random.choice(requests) if requests else request)
                status = await _read_response(reader)
                lat.append(time.perf_counter_ns() - start)
                errors += status != 200
        finally:
            writer.close()

    warm = time.perf_counter_ns() + 300_000_000
    await asyncio.gather(*(connection(warm) for _ in range(concurrency)))
    lat.clear()
    t0 = time.perf_counter_ns()
    await asyncio.gather(*(connection(t0 + int(seconds * 1e9)) for _ in range(concurrency)))
    return Run(np.asarray(lat, dtype=np.int64), (time.perf_counter_ns() - t0) / 1e9, errors)


def _seq_load(port: int, payload: dict, seconds: float) -> Run:
    import http.client

    body, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port)
    lat: list[int] = []
    errors = 0
    for i in range(2):  # warm-up pass, then the measured one
        lat.clear()
        t0 = time.perf_counter_ns()
        deadline = t0 + int((0.3 if i == 0 else seconds) * 1e9)
        while time.perf_counter_ns() < deadline:
            start = time.perf_counter_ns()
            conn.request("POST", PREDICT_PATH, body, headers)
            resp = conn.getresponse()
            resp.read()
            lat.append(time.perf_counter_ns() - start)
            errors += resp.status != 200
    conn.close()
    return Run(np.asarray(lat, dtype=np.int64), (time.perf_counter_ns() - t0) / 1e9, errors)


_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("WRK_BODY")
local stall_us = tonumber(os.getenv("WRK_STALL_US"))
done = function(summary, latency, requests)
   local stalls = 0
   for i = 1, #latency do
      local v, c = latency(i)  -- i-th distinct latency (us) and its count
      if v > stall_us then stalls = stalls + c end
   end
   local e = summary.errors
   io.write(string.format('{"requests": %d, "us": %d, "p50": %d, "p99": %d, "max": %d, '
      .. '"stalls": %d, "errors": %d}\\n', summary.requests, summary.duration,
      latency:percentile(50), latency:percentile(99), latency.max, stalls,
      e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def _wrk_load(
    port: int, payload: dict, concurrency: int, seconds: float, stall_ms: float, script: Path
) -> dict:
    env = {**os.environ, "WRK_BODY": json.dumps(payload), "WRK_STALL_US": str(int(stall_ms * 1e3))}
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{PREDICT_PATH}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(
    client: str,
    port: int,
    payload: dict,
    concurrency: int,
    seconds: float,
    stall_ms: float,
    script: Path,
    tenants: dict[str, str] | None = None,
) -> Run | dict:
    """One load window of ``client`` (async, seq or wrk) against the service on ``port``
    (``tenants``: spread the async client's requests over the tenants' model routes)."""
    if client == "async":
        return asyncio.run(_async_load(port, payload, concurrency, seconds, tenants))
    if client == "seq":
        return _seq_load(port, payload, seconds)
    return _wrk_load(port, payload, concurrency, seconds, stall_ms, script)


def rps_of(run: Run | dict) -> float:
    """Requests per second of one window's result."""
    return (
        run.latencies_ns.size / run.seconds if isinstance(run, Run) else run["requests"] / (run["us"] / 1e6)
    )


def service_command(port: int) -> list[str]:
    """The platform's BentoML service on ``port`` (as `mlops serve` starts it)."""
    return [
        str(Path(sys.executable).with_name("bentoml")),
        "serve",
        "serving.service:ScoringService",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--working-dir",
        str(REPO),
    ]


SERVICE_ENV = {
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLOPS__SERVING__RESTORE_STATE": "false",
}


# --------------------------------------------------------------------------- machine load

_TICK = os.sysconf("SC_CLK_TCK")


def _busy_ticks() -> int:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:8]]
    return sum(f) - f[3] - f[4]


def _tree_ticks(roots: set[int]) -> int:
    """CPU ticks used so far by ``roots`` and all their descendants."""
    procs: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            rest = raw[raw.rfind(")") + 2 :].split()
            procs[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    mine, grew = set(roots), True
    while grew:
        new = {p for p, (pp, _) in procs.items() if pp in mine and p not in mine}
        mine |= new
        grew = bool(new)
    return sum(procs[p][1] for p in mine if p in procs)


@contextlib.contextmanager
def foreign_cpu(roots: set[int], out: list[float]):
    """Append the cores used, during the block, by processes outside ``roots``' trees."""
    roots = roots | {os.getpid()}
    t0, busy0, own0 = time.monotonic(), _busy_ticks(), _tree_ticks(roots)
    yield
    secs = time.monotonic() - t0
    foreign = (_busy_ticks() - busy0) - (_tree_ticks(roots) - own0)
    out.append(max(foreign, 0) / _TICK / secs)


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def _server(cmd: list[str], cwd: Path, env: dict[str, str], port: int, log: Path, payload: dict):
    from adapters.services import started

    with started(
        cmd, _answers(port, payload), log, env={**os.environ, **env}, cwd=cwd, name=log.stem
    ) as proc:
        yield proc


def _answers(port: int, payload: dict):
    """A readiness probe: the server answers a prediction request with 200."""
    body = json.dumps(payload).encode()

    def ready() -> bool:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{PREDICT_PATH}", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    return ready


def _admin(port: int, token: str, state: dict) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/state",
        json.dumps(state).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="PUT",
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200


# --------------------------------------------------------------------------- report


def _print_table(results: dict, ratios: dict, foreign: dict, stall_ms: float, targets: list[str]) -> None:
    print(
        f"{'client':7s} {'target':8s} {'rps':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} "
        f"{'stalls>' + format(stall_ms, 'g') + 'ms':>11s} {'errors':>6s} {'foreign cores':>13s} {'cpu ms/req':>10s}"
    )
    for client, per in results.items():
        for name in targets:
            s = per[name]
            print(
                f"{client:7s} {name:8s} {s['rps']:8.1f} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.1f} "
                f"{s['stalls']:11d} {s['errors']:6d} {statistics.mean(foreign[client][name]):13.2f} "
                f"{s['server_cpu_ms_per_req']:10.3f}"
            )
        m, b = per["minimal"], per["bentoml"]
        per_round = ", ".join(f"{r:.2f}" for r in ratios[client])
        print(
            f"{client:7s} bentoml/minimal: rps {b['rps'] / m['rps']:.2f} (per round: {per_round})  "
            f"p50 {b['p50_ms'] / m['p50_ms']:.2f}  p99 {b['p99_ms'] / m['p99_ms']:.2f}  max {b['max_ms'] / m['max_ms']:.2f}  "
            f"server cpu/req {b['server_cpu_ms_per_req'] / m['server_cpu_ms_per_req']:.2f}"
        )
        if "shadow" in per:
            print(
                f"{client:7s} shadow/single: p99 {per['shadow']['p99_ms'] / b['p99_ms']:.2f}  "
                f"rps {per['shadow']['rps'] / b['rps']:.2f}"
            )
        if "tenants" in per:
            print(
                f"{client:7s} tenants/single: p99 {per['tenants']['p99_ms'] / b['p99_ms']:.2f}  "
                f"p50 {per['tenants']['p50_ms'] / b['p50_ms']:.2f}  rps {per['tenants']['rps'] / b['rps']:.2f}  "
                f"server cpu/req {per['tenants']['server_cpu_ms_per_req'] / b['server_cpu_ms_per_req']:.2f}"
            )
        if "canary" in per:
            print(
                f"{client:7s} canary/single: rps {per['canary']['rps'] / b['rps']:.2f}  "
                f"p99 {per['canary']['p99_ms'] / b['p99_ms']:.2f}"
            )


def _pool(client: str, runs: list, stall_ms: float) -> dict:
    if client == "wrk":  # wrk gives percentiles per window, not raw latencies
        secs = sum(r["us"] for r in runs) / 1e6
        return {
            "requests": sum(r["requests"] for r in runs),
            "rps": sum(r["requests"] for r in runs) / secs,
            "p50_ms": statistics.median(r["p50"] for r in runs) / 1e3,
            "p99_ms": max(r["p99"] for r in runs) / 1e3,
            "max_ms": max(r["max"] for r in runs) / 1e3,
            "stalls": sum(r["stalls"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
    return Run(
        np.concatenate([r.latencies_ns for r in runs]),
        sum(r.seconds for r in runs),
        sum(r.errors for r in runs),
    ).summary(stall_ms)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--duration", type=float, default=20.0, help="seconds of load per target and client (over all rounds)"
    )
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="alternating windows per target")
    ap.add_argument("--clients", default="async,wrk", help="comma-separated subset of async, wrk, seq")
    ap.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="minimal and bentoml always; shadow, canary, tenants (multi-model) optional",
    )
    ap.add_argument(
        "--mirror-pct", type=float, default=100.0, help="shadow target: share of requests mirrored"
    )
    ap.add_argument(
        "--canary-pct", type=float, default=50.0, help="canary target: share of users on the candidate"
    )
    ap.add_argument("--stall-ms", type=float, default=50.0)
    ap.add_argument(
        "--tenant-models",
        type=int,
        default=200,
        help="tenants target: tenant models, each request to one at random",
    )
    ap.add_argument(
        "--identical-tenants",
        action="store_true",
        help="tenants target: every tenant model the champion's ONNX (default: its architecture, "
        "different weights per tenant)",
    )
    ap.add_argument(
        "--home", type=Path, help="serve this MLOPS_HOME's champion (default: train one in a temp home)"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    clients = [c for c in args.clients.split(",") if c]
    targets = ["minimal", "bentoml"] + [
        t for t in args.targets.split(",") if t in ("shadow", "canary", "tenants")
    ]
    if "wrk" in clients and not shutil.which("wrk"):
        print("wrk not found: skipping the wrk client (apt-get install wrk)")
        clients.remove("wrk")
    for client in ("wrk", "seq"):
        if "tenants" in targets and client in clients:
            print(f"the tenants target spreads requests over many paths: skipping the {client} client")
            clients.remove(client)
    window = args.duration / args.rounds
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_dir:
        tmp = Path(tmp_dir)
        home, stable, candidate, model = prepare_home(args.home, tmp)
        from mlops.settings import load_settings
        from serving.auth import ensure_token

        token = ensure_token(load_settings(environ={"MLOPS_HOME": str(home)}))
        tenants = None
        if "tenants" in targets:
            kind = "identical" if args.identical_tenants else "distinct"
            print(f"registering {args.tenant_models} {kind} tenant models ...", flush=True)
            tenants = register_tenants(home, stable, args.tenant_models, args.identical_tenants)
        payload = sample_payload()
        lua = tmp / "post.lua"
        lua.write_text(_WRK_LUA)
        from adapters.services import free_port

        ports = {"minimal": free_port(), "bentoml": free_port()}
        py = sys.executable
        commands = {
            "minimal": [
                py,
                "-m",
                "uvicorn",
                "serving:minimal_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["minimal"]),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            "bentoml": service_command(ports["bentoml"]),
        }
        envs = {
            "minimal": {MODEL_ENV: str(model)},
            "bentoml": {
                "MLOPS_HOME": str(home),
                **SERVICE_ENV,
                "MLOPS__SERVING__TENANTS__ENABLED": "true",
                "MLOPS__SERVING__TENANTS__RATE_PER_SECOND": "1000000",
                "MLOPS__SERVING__TENANTS__BURST": "1000000",
                "MLOPS__SERVING__TENANTS__MAX_CONCURRENT": "1000",
            },
        }
        cwd = {"minimal": HERE, "bentoml": REPO}
        modes = {
            "bentoml": {"mode": "single", "stable_version": stable},
            "shadow": {
                "mode": "shadow",
                "mirror_pct": args.mirror_pct,
                "salt": "bench",
                "stable_version": stable,
                "candidate_version": candidate,
            },
            "canary": {
                "mode": "canary",
                "weight_pct": args.canary_pct,
                "salt": "bench",
                "stable_version": stable,
                "candidate_version": candidate,
            },
        }
        pooled: dict[str, dict[str, list]] = {c: {t: [] for t in targets} for c in clients}
        server_ticks: dict[str, dict[str, int]] = {c: {t: 0 for t in targets} for c in clients}
        foreign: dict[str, dict[str, list[float]]] = {c: {t: [] for t in targets} for c in clients}
        round_rps: dict[str, list[dict[str, float]]] = {c: [] for c in clients}
        with contextlib.ExitStack() as stack:
            procs = {
                name: stack.enter_context(
                    _server(commands[name], cwd[name], envs[name], ports[name], tmp / f"{name}.log", payload)
                )
                for name in ("minimal", "bentoml")
            }
            roots = {p.pid for p in procs.values()}
            if tenants:  # every tenant model loaded (cold) before the warm windows
                t0 = time.perf_counter()
                for path, tok in tenants.items():
                    req = urllib.request.Request(
                        f"http://127.0.0.1:{ports['bentoml']}{path}",
                        json.dumps(payload).encode(),
                        {"Content-Type": "application/json", "Authorization": f"Bearer {tok}"},
                    )
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        assert resp.status == 200
                print(f"{len(tenants)} tenant models loaded in {time.perf_counter() - t0:.1f} s", flush=True)
            for rnd in range(args.rounds):
                order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                for client in clients:
                    rps = {}
                    for name in order:
                        port = ports["minimal" if name == "minimal" else "bentoml"]
                        if name != "minimal":
                            _admin(port, token, modes.get(name, modes["bentoml"]))
                        server = {procs["minimal" if name == "minimal" else "bentoml"].pid}
                        ticks0 = _tree_ticks(server)
                        with foreign_cpu(roots, foreign[client][name]):
                            run = measure(
                                client,
                                port,
                                payload,
                                args.concurrency,
                                window,
                                args.stall_ms,
                                lua,
                                tenants if name == "tenants" else None,
                            )
                        server_ticks[client][name] += _tree_ticks(server) - ticks0
                        pooled[client][name].append(run)
                        rps[name] = rps_of(run)
                    round_rps[client].append(rps)
                print(f"round {rnd + 1}/{args.rounds} done", flush=True)
            _admin(ports["bentoml"], token, modes["bentoml"])

    results: dict[str, dict[str, dict]] = {}
    for client in clients:
        results[client] = {}
        for name in targets:
            results[client][name] = _pool(client, pooled[client][name], args.stall_ms)
            results[client][name]["server_cpu_ms_per_req"] = (
                server_ticks[client][name] / _TICK * 1e3 / max(results[client][name]["requests"], 1)
            )
    ratios = {c: [r["bentoml"] / r["minimal"] for r in round_rps[c]] for c in clients}
    print(
        f"\nconcurrency {args.concurrency} (seq: 1), {args.rounds} rounds x {window:.1f}s per target and client; "
        f"shadow mirrors {args.mirror_pct:g}%, canary sends {args.canary_pct:g}% of users to the candidate; "
        "wrk p99 is the worst window's, its p50 the median window's"
    )
    _print_table(results, ratios, foreign, args.stall_ms, targets)
    if "tenants" in targets:
        for client in clients:
            per = sorted(
                float(np.percentile(t.latencies_ns, 99) / np.percentile(b.latencies_ns, 99))
                for t, b in zip(pooled[client]["tenants"], pooled[client]["bentoml"], strict=True)
            )
            print(
                f"{client:7s} tenants/single p99 per round: median {statistics.median(per):.2f} "
                f"(min {per[0]:.2f}, max {per[-1]:.2f}; goal <= 1.2)"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": results,
                    "rps_ratio_per_round": ratios,
                    "foreign_cores": foreign,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
