"""Dask: a client for the scheduler named in the config, or for a local cluster of our own.

``client_for(cfg)`` connects to ``dask.address`` when one is configured; otherwise it
starts a ``LocalCluster`` sized to the machine (one worker process per
``threads_per_worker`` cores) the first time it is asked and hands back the same client
after that, so a backfill or a test session pays the few seconds of cluster start once per
process. Worker processes are spawned, which re-imports the entry module: scripts that
score must keep their work under ``if __name__ == "__main__":``.

A new local cluster is warmed in the background: its workers import ONNX Runtime,
pyarrow's Parquet reader and the scoring task while the driver is still resolving the model
and planning partitions. Great Expectations is not among them: a worker imports it only
for a partition that fails the Arrow checks, and importing it everywhere cost about ten
seconds of CPU per worker at every cold start.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import threading
from typing import TYPE_CHECKING

from mlops.errors import PlatformError
from mlops.settings import DaskConfig

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = "20s"

# Background work a local cluster does for a dashboard it does not serve, slowed or off so
# its CPU goes to scoring. Defaults in brackets; an idle two-worker cluster used 0.083
# CPU-seconds per second with them, 0.015 with these (docs/design/score-store.md):
# - the workers' statistical profiler, a stack sample of every thread (every 10 ms): off;
# - the event-loop health check of the scheduler and of each worker (20 ms): 1 s, still
#   well under the 3 s after which a blocked loop is reported;
# - the host CPU/memory/network sampler of every server (500 ms): 5 s;
# - the nanny's and worker's memory check (100 ms): 500 ms, so a worker over its memory
#   limit is still paused or restarted within half a second.
#
# The environment of the worker processes keeps the memory a partition used for the next
# one instead of handing it back to the kernel after each: Dask's default
# ``MALLOC_TRIM_THRESHOLD_`` fixes glibc's mmap threshold at 128 KiB, so every array of a
# partition was mapped, faulted in page by page and unmapped again, and mimalloc (pyarrow's
# allocator) purges freed pages after 10 ms. Both cost a page fault per 4 KiB touched,
# about 0.2 CPU-us per scored row; a worker now holds about one partition's peak instead.
WORKER_ENVIRON = {
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(512 << 20),
    "MIMALLOC_PURGE_DELAY": "-1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.nanny.pre-spawn-environ": WORKER_ENVIRON,
}
WARM_MODULES = ("onnxruntime", "pyarrow.parquet", "tasks.scoring")

_lock = threading.Lock()
_clients: dict[tuple[object, ...], Client] = {}
_atexit_registered = False


class ClusterError(PlatformError):
    """The Dask scheduler named in the config cannot be reached, or a local cluster cannot start."""

    exit_code = 7


def machine_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_workers(cfg: DaskConfig, cores: int) -> int:
    """Worker processes of a local cluster: as configured, else one per ``threads_per_worker`` cores."""
    return cfg.n_workers or max(1, cores // cfg.threads_per_worker)


def host_task_threads(client: Client) -> list[tuple[int, int]]:
    """``(cores, task threads)`` of each host running workers of ``client``'s cluster."""
    cores = client.run(machine_cores)
    hosts: dict[str, list[int]] = {}
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        entry = hosts.setdefault(info["host"], [cores.get(address, 1), 0])
        entry[1] += int(info["nthreads"])
    return [(c, t) for c, t in hosts.values()]


def _key(cfg: DaskConfig) -> tuple[object, ...]:
    if cfg.address:
        return ("address", cfg.address)
    return ("local", cfg.n_workers, cfg.threads_per_worker, cfg.processes, cfg.memory_limit)


def warm_worker(modules: tuple[str, ...] = WARM_MODULES) -> None:
    """Import the heavy modules scoring needs (run on each worker; idempotent)."""
    for name in modules:
        importlib.import_module(name)


async def _warm_in_background() -> None:
    # ``Client.run(wait=False)`` takes coroutines only; the imports run in a thread so the
    # worker's event loop (heartbeats, task traffic) is never blocked by them.
    await asyncio.get_running_loop().run_in_executor(None, warm_worker)


def _connect(cfg: DaskConfig) -> Client:
    import dask
    from distributed import Client, LocalCluster

    if cfg.address:
        try:
            return Client(cfg.address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {cfg.address}: {exc}") from exc
    try:
        with dask.config.set(LOCAL_CLUSTER_CONFIG):
            cluster = LocalCluster(
                n_workers=local_workers(cfg, machine_cores()),
                threads_per_worker=cfg.threads_per_worker,
                processes=cfg.processes,
                memory_limit=cfg.memory_limit,
                dashboard_address=None,
                # no dashboard; the scheduler's HTTP routes (health, metrics) on a free loopback
                # port, so two local clusters (or a user's own on 8787) do not collide
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.ERROR,
            )
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise ClusterError(f"cannot start a local Dask cluster: {exc}") from exc
    client = Client(cluster, set_as_default=False)
    try:
        client.run(_warm_in_background, wait=False)
    except (OSError, TimeoutError) as exc:  # only a head start; scoring imports what it needs
        log.debug("warming the local cluster failed: %s", exc)
    return client


def client_for(cfg: DaskConfig) -> Client:
    """A running client for ``cfg``: reused within the process, reconnected if it died."""
    key = _key(cfg)
    with _lock:
        client = _clients.get(key)
        if client is not None and client.status == "running":
            return client
        if client is not None:
            _close(client)
        client = _connect(cfg)
        _clients[key] = client
        global _atexit_registered
        if not _atexit_registered:
            atexit.register(close_all)
            _atexit_registered = True
        return client


def _close(client: Client) -> None:
    cluster = getattr(client, "cluster", None)
    try:
        client.close()
        if cluster is not None:
            cluster.close()
    except (OSError, RuntimeError, TimeoutError) as exc:
        log.debug("closing a Dask client: %s", exc)


def release(cfg: DaskConfig) -> None:
    """Close and forget the client of ``cfg`` (e.g. after its scheduler was shut down)."""
    with _lock:
        client = _clients.pop(_key(cfg), None)
    if client is not None:
        _close(client)


def close_all() -> None:
    """Close every client and the local clusters this process started."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        _close(client)
