"""Multi-tenant serving benchmark: 200 tenant models in one service vs. the single-model service.

One run, in one process: a temporary MLOPS_HOME whose registry holds the main model and
``--models`` tenant models ``fraud-detector--t000`` ... (a tiny logistic regression, or with
``--model gb`` the production default GradientBoosting; by default with different weights
per tenant, as per-merchant models of one architecture are, with ``--identical`` the same
ONNX for all), each its own registered model with ``champion`` at v1, and as many tenants,
each with its own token. The real ``ServingRuntime`` and Starlette app are driven through
httpx's ASGI transport (client and service share the process, alike for both targets).

Printed:
  * cold load: the first request to each model (alias resolved, ONNX fetched from the
    registry, session built and warmed up, then scored): p50 / p99 / max;
  * memory: resident set growth per loaded model (all ``--models`` loaded) and what the pool
    charges per model;
  * warm: p50 / p99 at ``--concurrency`` of the tenant route (each request to a random tenant
    model, all loaded) against ``/predict`` of the single-model service, in ``--trials``
    interleaved trials (the order alternating); the median and range of the per-trial
    ratios tenant p99 / single p99 (goal <= 1.2), the pooled ratio, and process CPU time per
    request (steadier than latency when other work shares the machine).

    python bench/tenants.py --models 200 --requests 1000 --trials 10 [--home DIR]

The same comparison over real sockets against the BentoML service is
``bench/serving.py --targets tenants``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # run by path: no shadowing
sys.path.insert(0, str(REPO))
BASE = "fraud-detector"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _register(settings, n: int, identical: bool, kind: str) -> list[str]:
    from bench.support import log_and_register, register_variants, weight_variants
    from mlops import modeling
    from mlops.datagen import generate
    from mlops.settings import GradientBoostingSpec, LogisticRegressionSpec
    from mlops.tenancy import tenant_model_name

    frame = generate(3000, seed=3)
    spec = GradientBoostingSpec() if kind == "gb" else LogisticRegressionSpec(max_iter=200)
    pipe = modeling.fit(spec, frame, settings.dataset, 0)
    names = [BASE] + [tenant_model_name(BASE, f"t{i:03d}") for i in range(n)]
    onnx = modeling.to_onnx_bytes(pipe, settings.dataset)
    if identical:
        log_and_register(settings, onnx, names)
    else:
        register_variants(settings, [onnx, *weight_variants(onnx, n, seed=1)], names)
    return names[1:]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def _load(http, targets: list[tuple[str, dict]], body: dict, concurrency: int, n: int) -> list[float]:
    out: list[float] = []
    left = [n]

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            path, headers = random.choice(targets)
            t = time.perf_counter()
            r = await http.post(path, json=body, headers=headers)
            out.append((time.perf_counter() - t) * 1e3)
            if r.status_code != 200:
                raise SystemExit(f"{path}: {r.status_code} {r.text}")

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return out


async def run(args: argparse.Namespace, home: Path) -> None:
    import httpx

    from mlops.datagen import generate
    from mlops.settings import load_settings
    from serving.app import RuntimeRef, build_app
    from serving.runtime import ServingRuntime
    from serving.tenants import add_tenant

    env = {
        "MLOPS_HOME": str(home),
        "MLOPS__SERVING__TENANTS__ENABLED": "true",
        "MLOPS__SERVING__TENANTS__RATE_PER_SECOND": "100000",
        "MLOPS__SERVING__TENANTS__BURST": "100000",
        "MLOPS__SERVING__LOG_FLUSH_SECONDS": "5",
    }
    settings = load_settings(environ=env)
    saved = home / "bench-tenants.json"
    kind = ("identical" if args.identical else "distinct") + f" {args.model}"
    if saved.exists():
        kept = json.loads(saved.read_text())
        if kept.get("models") != kind:
            raise SystemExit(
                f"{home} holds {kept.get('models')} tenant models; use another --home for {kind} ones"
            )
        tokens = kept["tokens"]
        names = list(tokens)
        print(f"reusing {len(names)} {kind} tenant models registered in {home}")
    else:
        t = time.perf_counter()
        names = await asyncio.to_thread(_register, settings, args.models, args.identical, args.model)
        print(
            f"registered {len(names)} {kind} tenant models + the main one in {time.perf_counter() - t:.1f} s"
        )
        tokens = {name: add_tenant(settings, name.rsplit("--", 1)[1]) for name in names}
        saved.write_text(json.dumps({"models": kind, "tokens": tokens}))
    schema = settings.dataset
    row = generate(1, seed=5).to_dict("records")[0]
    body = {
        "features": {
            n: (float(row[n]) if n in schema.numeric_names else str(row[n])) for n in schema.feature_names
        }
    }

    rt = ServingRuntime.for_model(settings, BASE)
    await asyncio.to_thread(rt.bootstrap)
    rt.start()
    transport = httpx.ASGITransport(app=build_app(RuntimeRef(rt)))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        tenant_targets = [
            (f"/tenants/models/{name}/predict", {"Authorization": f"Bearer {tokens[name]}"}) for name in names
        ]
        rss0 = _rss_bytes()
        cold = []
        for path, headers in tenant_targets:
            t = time.perf_counter()
            r = await http.post(path, json=body, headers=headers)
            cold.append((time.perf_counter() - t) * 1e3)
            assert r.status_code == 200, r.text
        rss1 = _rss_bytes()
        pool = rt.tenants.pool
        print(
            f"cold load (first request per model, n={len(cold)}): p50 {_pct(cold, 50):.1f} ms, "
            f"p99 {_pct(cold, 99):.1f} ms, max {max(cold):.1f} ms "
            f"(of which model build p50 {_pct(rt.tenants.load_seconds, 50) * 1e3:.1f} ms)"
        )
        print(
            f"memory: {len(pool.models)} models loaded, RSS +{(rss1 - rss0) / 2**20:.1f} MiB = "
            f"{(rss1 - rss0) / len(pool.models) / 2**10:.0f} KiB per model "
            f"(pool charges {pool.loaded_bytes / len(pool.models) / 2**10:.0f} KiB each)"
        )
        single = [("/predict", {})]
        await _load(http, single, body, args.concurrency, 200)  # warm both paths
        await _load(http, tenant_targets, body, args.concurrency, 200)
        if args.hot:
            tenant_targets = tenant_targets[: args.hot]
            print(f"warm load spread over {len(tenant_targets)} of the {len(names)} models")
        results: dict[str, list[float]] = {"single": [], "tenants": []}
        cpu: dict[str, float] = {"single": 0.0, "tenants": 0.0}
        trials: list[tuple[float, float]] = []  # (p50 ratio, p99 ratio) of each trial
        for trial in range(args.trials):
            order = [("single", single), ("tenants", tenant_targets)]
            if trial % 2:
                order.reverse()
            p50, p99 = {}, {}
            for label, targets in order:
                c0 = time.process_time()
                lat = await _load(http, targets, body, args.concurrency, args.requests)
                cpu[label] += time.process_time() - c0
                results[label] += lat
                p50[label], p99[label] = _pct(lat, 50), _pct(lat, 99)
            trials.append((p50["tenants"] / p50["single"], p99["tenants"] / p99["single"]))
        for label, lat in results.items():
            print(
                f"warm {label:8s} c={args.concurrency}: n={len(lat)} "
                f"p50 {_pct(lat, 50):.2f} ms, p99 {_pct(lat, 99):.2f} ms, "
                f"process CPU {cpu[label] / len(lat) * 1e3:.3f} ms/request (client included)"
            )
        p99s = sorted(r[1] for r in trials)
        p50s = sorted(r[0] for r in trials)
        print(
            f"warm p99 ratio tenants/single over {len(trials)} interleaved trials: median "
            f"{statistics.median(p99s):.2f} (min {p99s[0]:.2f}, max {p99s[-1]:.2f}; goal <= 1.2); "
            f"p50 ratio median {statistics.median(p50s):.2f} (min {p50s[0]:.2f}, max {p50s[-1]:.2f}); "
            f"pooled p99 ratio {_pct(results['tenants'], 99) / _pct(results['single'], 99):.2f}; "
            f"CPU per request ratio {cpu['tenants'] / cpu['single']:.2f}"
        )
    await rt.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the benchmark in a temporary MLOPS_HOME, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000, help="per target per trial")
    ap.add_argument("--trials", type=int, default=10, help="interleaved trials (order alternating)")
    ap.add_argument(
        "--identical",
        action="store_true",
        help="every tenant model the same ONNX (default: the same architecture, different weights)",
    )
    ap.add_argument(
        "--model",
        choices=("logistic", "gb"),
        default="logistic",
        help="tenant (and main) model: a logistic regression, or the production default GradientBoosting",
    )
    ap.add_argument("--hot", type=int, default=0, help="warm load on only the first N models (0: all)")
    ap.add_argument("--home", type=Path, help="keep the registry here and reuse it on the next run")
    args = ap.parse_args(argv)
    random.seed(0)
    if args.home is not None:
        asyncio.run(run(args, args.home))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as tmp:
        asyncio.run(run(args, Path(tmp) / "home"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
