"""Batch scoring benchmark: `mlops score` against the physical limit and a naive baseline.

    .venv/bin/python bench/batch_scoring.py --rows 10000000

In one run, on the same generated input and the same model (the platform's default
gradient-boosting candidate, 100 trees, exported to ONNX and registered as champion):

  (a) physical limit: ``InferenceSession.run`` over the input already in memory as feeds,
      one session per core in as many processes as cores (nothing else is timed); (a2) the
      same with the graph that takes category codes (``CodedScorer``), which the scoring
      workers run, so c/a2 compares like with like;
  (b) naive baseline: ``pandas.read_parquet`` -> predict in one process -> ``to_parquet``,
      with the scikit-learn pipeline (b_sklearn) and with one ONNX Runtime session using all
      cores (b_onnx); ``b`` is the faster of the two;
  (c) `mlops score` end to end: the scoring flow (read, validate with the GX suite's checks
      on Arrow, score, stage, commit, DuckDB) on a warm local Dask cluster; the cold start
      (imports, cluster start with the workers' imports, the temporary Prefect API) is
      measured first and reported apart, then a small first run warms the sessions.

It prints rows/s of each, the ratios c/a and c/b, where (c)'s CPU goes (per worker phase
and per process), peak memory (RSS) of (b) and of (c)'s driver and workers (and against
the last run at another N, from ``--workdir``'s ``results-N.json``), and checks that (c) wrote exactly N rows, that DuckDB counts N, and
that its scores equal (a)'s raw ONNX Runtime scores row for row.

Each measured phase runs in a fresh subprocess of this script (``--phase``), so their peak
memories do not mix. Model and input are cached in ``--workdir`` across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import threading
import time
from datetime import date, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RUN_DATE = date(2026, 3, 1)
WARM_DATE = date(2026, 2, 28)
WARM_ROWS = 20_000


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(result: dict[str, object]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- preparation


def prepare(workdir: Path, rows: int) -> tuple[Path, Path, Path]:
    """The model (sklearn pickle + ONNX) and the N-row input, generated once and cached."""
    from adapters.datasets import write_parquet
    from mlops import modeling
    from mlops.datagen import generate, generate_blocks
    from mlops.settings import GradientBoostingSpec, load_settings

    workdir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(environ={})
    pkl, onnx_path = workdir / "model.pkl", workdir / "model.onnx"
    if not onnx_path.exists():
        print("training the default gradient-boosting candidate (once)...", flush=True)
        pipe = modeling.fit(GradientBoostingSpec(), generate(60_000, seed=1), settings.dataset, 7)
        pkl.write_bytes(pickle.dumps(pipe))
        onnx_path.write_bytes(modeling.to_onnx_bytes(pipe, settings.dataset))
    data = workdir / f"input-{rows}.parquet"
    if not data.exists():
        print(f"generating {rows:,} rows...", flush=True)
        write_parquet(generate_blocks(rows, seed=11, start=datetime(2026, 3, 1)), data)
    return pkl, onnx_path, data


# --------------------------------------------------------------------------- (a) raw ORT


def _raw_child(rank: int, procs: int, data: str, onnx_path: str, barrier, queue) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from mlops.onnx_model import CodedScorer, OnnxScorer
    from mlops.settings import load_settings

    schema = load_settings(environ={}).dataset
    scorer = OnnxScorer(Path(onnx_path).read_bytes(), schema, threads=1)
    pf = pq.ParquetFile(data)
    mine = [rg for rg in range(pf.num_row_groups) if rg % procs == rank]
    feeds = [
        scorer.feeds(pf.read_row_group(rg, columns=list(schema.feature_names)).to_pandas()) for rg in mine
    ]
    scorer.run(feeds[0]) if feeds else None  # warm up
    barrier.wait()
    t0, c0 = time.monotonic(), time.process_time()
    scores = [scorer.run(f) for f in feeds]
    t1, c1 = time.monotonic(), time.process_time()
    # The same rows through the graph that takes category codes (what scoring workers run).
    del feeds
    coded = CodedScorer(Path(onnx_path).read_bytes(), schema, threads=1)
    coded_feeds = [
        coded.table_feeds(pf.read_row_group(rg, columns=list(schema.feature_names))) for rg in mine
    ]
    coded.run_table(coded_feeds[0]) if coded_feeds else None
    barrier.wait()
    t2, c2 = time.monotonic(), time.process_time()
    coded_scores = [coded.run_table(f) for f in coded_feeds]
    t3, c3 = time.monotonic(), time.process_time()
    same = all(np.array_equal(a, b) for a, b in zip(scores, coded_scores, strict=True))
    queue.put((rank, mine, t0, t1, c1 - c0, [np.asarray(s) for s in scores], t2, t3, c3 - c2, same))


def phase_raw(data: Path, onnx_path: Path, procs: int) -> None:
    import multiprocessing as mp

    import numpy as np
    import pyarrow.parquet as pq

    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(target=_raw_child, args=(r, procs, str(data), str(onnx_path), barrier, queue))
        for r in range(procs)
    ]
    for c in children:
        c.start()
    got = [queue.get() for _ in children]
    for c in children:
        c.join()
    n_rg = pq.ParquetFile(data).num_row_groups
    by_rg: list[np.ndarray] = [np.empty(0)] * n_rg
    for _, mine, _, _, _, scores, *_ in got:
        for rg, s in zip(mine, scores, strict=True):
            by_rg[rg] = s
    all_scores = np.concatenate(by_rg)
    np.save(data.with_suffix(".raw-scores.npy"), all_scores)
    wall = max(g[3] for g in got) - min(g[2] for g in got)
    _emit(
        {
            "phase": "raw",
            "rows": int(all_scores.size),
            "seconds": wall,
            "procs": procs,
            "cpu_seconds": sum(g[4] for g in got),
            "codes_seconds": max(g[7] for g in got) - min(g[6] for g in got),
            "codes_cpu_seconds": sum(g[8] for g in got),
            "codes_scores_equal": all(g[9] for g in got),
            "load": os.getloadavg()[0],
        }
    )


# --------------------------------------------------------------------------- (b) naive


def phase_naive(data: Path, pkl: Path, onnx_path: Path, out: Path, engine: str) -> None:
    import numpy as np
    import pandas as pd

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    df = pd.read_parquet(data)
    if engine == "sklearn":
        pipe = pickle.loads(pkl.read_bytes())
        scores = pipe.predict_proba(df)[:, 1]
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(onnx_path.read_bytes(), providers=["CPUExecutionProvider"])
        feeds = {
            i.name: (
                df[i.name].to_numpy(np.float32) if i.type == "tensor(float)" else df[i.name].to_numpy(object)
            ).reshape(-1, 1)
            for i in sess.get_inputs()
        }
        scores = sess.run(["probabilities"], feeds)[0][:, 1]
    res = pd.DataFrame(
        {
            "transaction_id": df["transaction_id"],
            "user_id": df["user_id"],
            "score": scores,
            "decision": scores >= 0.2,
        }
    )
    res.to_parquet(out)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _emit(
        {
            "phase": f"naive_{engine}",
            "rows": len(df),
            "seconds": seconds,
            "peak_rss_mb": _rss_peak_mb(),
            "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu0,
            "load": os.getloadavg()[0],
        }
    )


# --------------------------------------------------------------------------- (c) mlops score


class TreeMemory:
    """Samples the RSS of this process and its descendants (Dask workers, Prefect API)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak_total = self.peak_driver = 0.0
        self.peak_worker = 0.0
        self._is_worker: dict[int, bool] = {}
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            self.cpu_seconds = time.thread_time()  # this thread's own CPU, not the platform's
            try:
                driver = self.me.memory_info().rss
                workers, other = [], 0
                for child in self.me.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                        if child.pid not in self._is_worker:  # read each command line once
                            cmd = " ".join(child.cmdline())
                            self._is_worker[child.pid] = "multiprocessing" in cmd or "distributed" in cmd
                    except psutil.Error:
                        continue
                    if self._is_worker[child.pid]:
                        workers.append(rss)
                    else:
                        other += rss
                mb = 1024 * 1024
                self.peak_driver = max(self.peak_driver, driver / mb)
                self.peak_worker = max([self.peak_worker, *(w / mb for w in workers)])
                self.peak_total = max(self.peak_total, (driver + sum(workers) + other) / mb)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def phase_mlops(
    data: Path, onnx_path: Path, home: Path, rows_per_partition: int | None, ort_threads: int | None
) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    t_start = time.perf_counter()
    os.environ["MLOPS_HOME"] = str(home)
    if rows_per_partition:
        os.environ["MLOPS__SCORING__ROWS_PER_PARTITION"] = str(rows_per_partition)
    if ort_threads:
        os.environ["MLOPS__SCORING__ORT_THREADS"] = str(ort_threads)
        os.environ["MLOPS__DASK__THREADS_PER_WORKER"] = str(ort_threads)
    from adapters.runtime import configure
    from mlops.settings import load_settings

    settings = load_settings()
    configure(settings)  # before Prefect is imported: it reads its settings once
    cold: dict[str, float] = {}
    t0 = time.perf_counter()
    from flows.score import score_flow

    cold["imports"] = time.perf_counter() - t0 + (t0 - t_start)
    from adapters import storage
    from adapters.dask_cluster import client_for
    from adapters.datasets import write_parquet
    from mlops.datagen import generate_blocks

    _register(settings, onnx_path.read_bytes())
    warm_input = home / "warm.parquet"
    write_parquet(generate_blocks(WARM_ROWS, seed=3, start=datetime(2026, 2, 28)), warm_input)

    with TreeMemory() as mem:
        t0 = time.perf_counter()
        client = client_for(settings.dask)
        # What scoring a partition imports (GX only for a failing one, so not here).
        client.run(_warm_imports)
        cold["cluster"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _nop_flow()
        cold["prefect_api"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        score_flow(run_date=WARM_DATE.isoformat(), input_path=str(warm_input))
        cold["first_run"] = time.perf_counter() - t0
        cpu0, sampler0 = _tree_cpu(), mem.cpu_seconds
        t0 = time.perf_counter()
        summary = score_flow(run_date=RUN_DATE.isoformat(), input_path=str(data))
        seconds = time.perf_counter() - t0
        cpu1, sampler1 = _tree_cpu(), mem.cpu_seconds
    cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    cpu["driver"] -= sampler1 - sampler0  # the memory sampler runs in the driver process

    count = (
        storage.query(home, "SELECT count(*) AS n FROM scores WHERE run_date = ?", [RUN_DATE])
        .column("n")[0]
        .as_py()
    )
    folder = home / "scores" / f"run_date={RUN_DATE}"
    written = np.concatenate(
        [
            pq.read_table(p, columns=["score"]).column("score").to_numpy()
            for p in sorted(folder.glob("part-*.parquet"))
        ]
    )
    raw = (
        np.load(data.with_suffix(".raw-scores.npy")) if data.with_suffix(".raw-scores.npy").exists() else None
    )
    _emit(
        {
            "phase": "mlops",
            "rows": summary.rows_out,
            "rows_in": summary.rows_in,
            "seconds": seconds,
            "cold_start_seconds": cold["imports"] + cold["cluster"] + cold["prefect_api"],
            "cold_start": cold,
            "duckdb_count": count,
            "partitions": summary.partitions,
            "phases": summary.seconds,
            "scores_equal_raw": bool(
                raw is not None and raw.shape == written.shape and np.array_equal(raw, written)
            ),
            "peak_total_mb": mem.peak_total,
            "peak_driver_mb": mem.peak_driver,
            "peak_worker_mb": mem.peak_worker,
            "rows_per_partition": settings.scoring.rows_per_partition,
            "ort_threads": settings.scoring.ort_threads,
            "cpu_seconds": sum(cpu.values()),
            "cpu_by_process": cpu,
            "sampler_cpu_seconds": sampler1 - sampler0,
            "load": os.getloadavg()[0],
        }
    )


def _nop_flow() -> None:
    """A flow that does nothing: its first run starts the temporary Prefect API."""
    from prefect import flow

    flow(name="bench-nop")(lambda: None)()


def _tree_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process and its live descendants, by role: the driver
    (this process: Prefect engine, Dask scheduler and nannies), the Dask workers, the rest
    (the temporary Prefect API server)."""
    import psutil

    out = {"driver": 0.0, "workers": 0.0, "other": 0.0}
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            if p.pid == me.pid:
                role = "driver"
            else:  # worker processes are spawned by the nannies, which run in the driver
                role = "workers" if "spawn_main" in " ".join(p.cmdline()) else "other"
            out[role] += t.user + t.system
        except psutil.Error:
            continue
    return out


def _warm_imports() -> None:
    """Run on each worker: import what scoring a partition needs, as a long-lived cluster has."""
    import pyarrow.compute  # noqa: F401

    import tasks.scoring  # noqa: F401


def _register(settings, onnx_model: bytes) -> None:
    from bench.support import log_onnx_model
    from registry.mlflow_registry import ModelRegistry

    registry = ModelRegistry(settings)
    name = settings.training.model_name
    if "champion" in registry.aliases(name):
        return
    logged = log_onnx_model(settings, onnx_model, "bench-model")
    version = registry.register(
        name, logged.model_uri, logged.run_id, {"decision_threshold": "0.2"}, "benchmark"
    ).version
    registry.move_alias(name, "champion", version, reason="benchmark")


# --------------------------------------------------------------------------- orchestration


def _run_phase(*args: str) -> dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"phase {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlops-bench"))
    parser.add_argument(
        "--rows-per-partition", type=int, default=None, help="override scoring.rows_per_partition"
    )
    parser.add_argument(
        "--ort-threads", type=int, default=None, help="threads per worker and per ORT session"
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--phase", choices=["raw", "naive_sklearn", "naive_onnx", "mlops"], help=argparse.SUPPRESS
    )
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    pkl, onnx_path, data = (
        args.workdir / "model.pkl",
        args.workdir / "model.onnx",
        args.workdir / f"input-{args.rows}.parquet",
    )
    if args.phase == "raw":
        return phase_raw(data, onnx_path, os.cpu_count() or 1)
    if args.phase in ("naive_sklearn", "naive_onnx"):
        return phase_naive(data, pkl, onnx_path, args.workdir / "naive-out.parquet", args.phase.split("_")[1])
    if args.phase == "mlops":
        return phase_mlops(data, onnx_path, args.home, args.rows_per_partition, args.ort_threads)

    import shutil

    prepare(args.workdir, args.rows)
    common = ["--rows", str(args.rows), "--workdir", str(args.workdir)]
    results = {"raw": _run_phase("--phase", "raw", *common)}
    if not args.skip_naive:
        results["naive_sklearn"] = _run_phase("--phase", "naive_sklearn", *common)
        results["naive_onnx"] = _run_phase("--phase", "naive_onnx", *common)
    home = args.workdir / f"home-{args.rows}"
    shutil.rmtree(home, ignore_errors=True)
    extra = (["--rows-per-partition", str(args.rows_per_partition)] if args.rows_per_partition else []) + (
        ["--ort-threads", str(args.ort_threads)] if args.ort_threads else []
    )
    results["mlops"] = _run_phase("--phase", "mlops", "--home", str(home), *common, *extra)

    n = args.rows
    cores = os.cpu_count() or 1
    rate = {k: v["rows"] / v["seconds"] for k, v in results.items()}
    per_cpu = {k: v["rows"] / v["cpu_seconds"] for k, v in results.items()}
    c, a = rate["mlops"], rate["raw"]
    m = results["mlops"]
    cold_rate = n / (m["seconds"] + m["cold_start_seconds"])
    print(f"\nbatch scoring benchmark: {n:,} rows, {cores} cores (shared: load average given per phase)")
    print(f"  {'':44s} {'rows/s':>10s} {'rows/CPU-s':>11s} {'load':>5s}")

    def line(label: str, key: str, extra: str = "") -> None:
        r = results[key]
        print(f"  {label:44s} {rate[key]:>10,.0f} {per_cpu[key]:>11,.0f} {r['load']:>5.1f}  {extra}")

    line(f"(a) raw InferenceSession.run, {results['raw']['procs']} processes", "raw")
    r = results["raw"]
    codes_rate, codes_per_cpu = r["rows"] / r["codes_seconds"], r["rows"] / r["codes_cpu_seconds"]
    print(
        f"  {'(a2) the same, category codes graph':44s} {codes_rate:>10,.0f} {codes_per_cpu:>11,.0f} {r['load']:>5.1f}"
        f"  scores == (a): {r['codes_scores_equal']}"
    )
    if "naive_sklearn" in results:
        line(
            "(b) naive: pandas + scikit-learn + pandas",
            "naive_sklearn",
            f"peak RSS {results['naive_sklearn']['peak_rss_mb']:,.0f} MB",
        )
        line(
            "(b) naive: pandas + ORT (all cores) + pandas",
            "naive_onnx",
            f"peak RSS {results['naive_onnx']['peak_rss_mb']:,.0f} MB",
        )
    line(
        "(c) mlops score (warm cluster)",
        "mlops",
        f"{m['partitions']} partitions of <= {m['rows_per_partition']:,} rows",
    )
    cs = m["cold_start"]
    print(
        f"      cold start {m['cold_start_seconds']:.1f} s (imports {cs['imports']:.1f}, cluster {cs['cluster']:.1f}, "
        f"Prefect API {cs['prefect_api']:.1f}) -> {cold_rate:,.0f} rows/s including it; "
        f"then a first run of {WARM_ROWS:,} rows {cs['first_run']:.1f} s"
    )
    print(
        f"      peak RSS: total {m['peak_total_mb']:,.0f} MB, driver {m['peak_driver_mb']:,.0f} MB, largest worker {m['peak_worker_mb']:,.0f} MB"
    )
    print(f"      phases (s; workers_* summed over partitions): {json.dumps(m['phases'])}")
    raw_us = results["raw"]["cpu_seconds"] / n * 1e6
    worker_us = {
        k[len("workers_") : -len("_cpu")]: v / n * 1e6
        for k, v in m["phases"].items()
        if k.startswith("workers_") and k.endswith("_cpu")
    }
    print(
        f"      CPU per row: raw ORT {raw_us:.2f} us; mlops workers "
        + ", ".join(f"{k} {v:.2f} us" for k, v in worker_us.items())
        + f"; whole tree {m['cpu_seconds'] / n * 1e6:.2f} us ("
        + ", ".join(f"{k} {v / n * 1e6:.2f}" for k, v in m["cpu_by_process"].items())
        + f"; not counted: the benchmark's memory sampler {m['sampler_cpu_seconds'] / n * 1e6:.2f})"
    )
    ca_cpu = per_cpu["mlops"] / per_cpu["raw"]
    print(
        f"  c/a = {c / a:.2f} wall, {ca_cpu:.2f} per CPU-second   "
        f"(goal >= 0.6; {0.8 - ca_cpu:+.2f} per CPU-second to the 0.8 aim)"
    )
    print(
        f"  c/a2 = {c / codes_rate:.2f} wall, {per_cpu['mlops'] / codes_per_cpu:.2f} per CPU-second   "
        "(against raw ONNX Runtime fed codes, as the workers are)"
    )
    if "naive_sklearn" in results:
        bk = max(("naive_sklearn", "naive_onnx"), key=lambda k: rate[k])
        print(
            f"  c/b = {c / rate[bk]:.2f} wall against the faster naive ({bk}); c/b_sklearn = {c / rate['naive_sklearn']:.2f}   (goal >= 2)"
        )
    (args.workdir / f"results-{n}.json").write_text(json.dumps(results, indent=1))
    for other in sorted(args.workdir.glob("results-*.json")):
        other_n = int(other.stem.split("-")[1])
        if other_n != n:
            o = json.loads(other.read_text())["mlops"]
            print(
                f"  peak RSS at {n:,} vs {other_n:,} rows (earlier run): largest worker "
                f"{m['peak_worker_mb'] / o['peak_worker_mb']:.2f}x, driver {m['peak_driver_mb'] / o['peak_driver_mb']:.2f}x, "
                f"total {m['peak_total_mb'] / o['peak_total_mb']:.2f}x   (goal: within 10 %)"
            )
    ok = m["rows"] == n and m["duckdb_count"] == n and m["scores_equal_raw"] and r["codes_scores_equal"]
    print(
        f"  check: rows written {m['rows']:,}, DuckDB count {m['duckdb_count']:,}, scores == raw ORT: {m['scores_equal_raw']} -> {'OK' if ok else 'FAILED'}"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
