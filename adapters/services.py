"""Long-running services on loopback: a Prefect server, a process worker, an MLflow
tracking server and the online model service (BentoML), started detached with pid files
and logs under ``$MLOPS_HOME/run``.

``up`` is idempotent (a service whose pid is alive is left alone); ``down`` stops exactly
the processes it started, with their whole process trees, and nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec

import httpx
import psutil

from adapters.runtime import runtime_environment
from mlops.errors import PlatformError
from mlops.settings import CONFIG_ENV, Settings

_P = ParamSpec("_P")


class ServiceError(PlatformError):
    """A service did not start, did not become healthy in time, or could not be stopped."""


@dataclass(frozen=True)
class Service:
    """A long-running process ``up`` starts: its command, URL, health URL and environment."""

    name: str
    argv: tuple[str, ...]
    url: str | None = None
    health_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    ready: Callable[[], bool] | None = None  # readiness check of a service without a health URL


def project_dir() -> Path:
    """The folder holding prefect.yaml and the flow code (the deployments' working directory)."""
    return Path(__file__).resolve().parent.parent


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def prefect_api_url(settings: Settings) -> str:
    """The API URL of the Prefect server ``up`` starts for these settings."""
    s = settings.services
    return f"http://{s.host}:{s.prefect_port}/api"


SERVING_SERVICE = "serving.service:ScoringService"


def serving_command(settings: Settings, host: str | None = None, port: int | None = None) -> tuple[str, ...]:
    """``bentoml serve`` of the platform's online service (``mlops serve`` runs it in the foreground)."""
    s = settings.services
    return (
        _bin("bentoml"),
        "serve",
        SERVING_SERVICE,
        "--host",
        host or s.host,
        "--port",
        str(port or s.serving_port),
        "--working-dir",
        str(project_dir()),
    )


def serving_environment(settings: Settings) -> dict[str, str]:
    """The service process's environment: this instance's MLOPS_HOME and backends."""
    env = runtime_environment(settings) | {"MLOPS_PROJECT_DIR": str(project_dir())}
    env.pop("PREFECT_API_URL", None)
    return env


def plan(settings: Settings, config: str | Path | None = None) -> list[Service]:
    """The services `mlops server up` starts for these settings, in start order.

    ``config``, the file the settings were loaded from, is handed to every service as
    ``MLOPS_CONFIG``: the worker's flow runs (nightly scoring on ``dask.address``, ...) and
    the online service load the same settings as the command that started them.
    """
    s = settings.services
    api = prefect_api_url(settings)
    base = runtime_environment(settings) | {"MLOPS_PROJECT_DIR": str(project_dir())}
    if config:
        base[CONFIG_ENV] = str(Path(config).resolve())
    base.pop("PREFECT_API_URL", None)
    services = [
        Service(
            "prefect-server",
            (
                _bin("prefect"),
                "server",
                "start",
                "--host",
                s.host,
                "--port",
                str(s.prefect_port),
                "--analytics-off",
            ),
            url=f"http://{s.host}:{s.prefect_port}",
            health_url=f"{api}/health",
            env=base | {"PREFECT_SERVER_LOGGING_LEVEL": "WARNING"},
        ),
        Service(
            "prefect-worker",
            (
                _bin("prefect"),
                "worker",
                "start",
                "--pool",
                settings.prefect.work_pool,
                "--type",
                "process",
                "--name",
                f"mlops-worker-{s.prefect_port}",
                "--install-policy",
                "never",
            ),
            env=base | {"PREFECT_API_URL": api},
        ),
        Service(
            "mlflow",
            (
                _bin("mlflow"),
                "server",
                "--backend-store-uri",
                settings.tracking_uri,
                "--default-artifact-root",
                settings.artifact_location,
                "--no-serve-artifacts",
                "--host",
                s.host,
                "--port",
                str(s.mlflow_port),
                "--workers",
                "1",
            ),
            url=f"http://{s.host}:{s.mlflow_port}",
            health_url=f"http://{s.host}:{s.mlflow_port}/health",
            env=base,
        ),
    ]
    services += _broker_services(settings)
    if settings.serving.url:  # the online service runs elsewhere (serving.url)
        return services
    services += [
        Service(
            "serving",
            serving_command(settings),
            url=f"http://{s.host}:{s.serving_port}",
            # Live, not ready: a fresh home has no champion to serve yet.
            health_url=f"http://{s.host}:{s.serving_port}/v2/health/live",
            env=serving_environment(settings) | ({CONFIG_ENV: base[CONFIG_ENV]} if config else {}),
        ),
    ]
    return services


def _broker_services(settings: Settings) -> list[Service]:
    """redis-server on loopback when ``stream.broker`` is a Redis broker without an external ``url``."""
    from adapters.broker_redis import redis_ready, redis_server_command

    spec = settings.stream.broker
    if getattr(spec, "kind", None) != "redis" or spec.url:
        return []
    folder = settings.run_dir / "redis-broker"
    return [
        Service(
            "redis-broker",
            redis_server_command(spec.host, spec.port, folder, spec.appendfsync),
            url=spec.effective_url,
            ready=lambda: redis_ready(spec.effective_url),
        )
    ]


# --------------------------------------------------------------------------- pid files


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid.json"


def _read_pid(settings: Settings, name: str) -> dict | None:
    try:
        return json.loads(_pid_file(settings, name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(record: dict | None) -> psutil.Process | None:
    """The recorded process if it still runs (same pid *and* start time: no pid reuse)."""
    if not record:
        return None
    try:
        proc = psutil.Process(record["pid"])
        # A start time within seconds of the recorded one: the same process. (psutil derives
        # it from the boot time, which the kernel may report a second apart between reads.)
        if abs(proc.create_time() - record["create_time"]) > 5.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, KeyError):
        return None


def running(settings: Settings) -> dict[str, dict]:
    """Services of this MLOPS_HOME that are alive now: name -> pid record."""
    out = {}
    for svc in plan(settings):
        record = _read_pid(settings, svc.name)
        if _alive(record):
            out[svc.name] = record
    return out


def active_prefect_api(settings: Settings) -> str | None:
    """The Prefect API URL of a server `mlops server up` started for this home, if alive."""
    record = running(settings).get("prefect-server")
    return record.get("api_url") if record else None


# --------------------------------------------------------------------------- up / down


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_online(settings: Settings) -> bool:
    url = f"{prefect_api_url(settings)}/work_pools/{settings.prefect.work_pool}/workers/filter"
    try:
        resp = httpx.post(url, json={}, timeout=2.0)
        return resp.status_code == 200 and any(w.get("status") == "ONLINE" for w in resp.json())
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(settings: Settings, svc: Service) -> dict:
    """Start one service detached (its own session), record its pid, wait until healthy."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    existing = _read_pid(settings, svc.name)
    if _alive(existing):
        return existing | {"already_running": True}
    log = settings.run_dir / f"{svc.name}.log"
    proc = spawn(svc.argv, log, env=os.environ.copy() | svc.env, append=True)
    record = {
        "name": svc.name,
        "pid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "argv": list(svc.argv),
        "url": svc.url,
        "log": str(log),
        "started_at": time.time(),
        "api_url": prefect_api_url(settings) if svc.name == "prefect-server" else None,
    }
    _pid_file(settings, svc.name).write_text(json.dumps(record, indent=1))
    ready = svc.ready or (http_ok(svc.health_url) if svc.health_url else (lambda: _worker_online(settings)))
    try:
        wait_ready(proc, ready, log, settings.services.startup_timeout_seconds, name=svc.name, poll=0.5)
    except ServiceError:
        if proc.poll() is None:
            stop(settings, svc.name)
        _pid_file(settings, svc.name).unlink(missing_ok=True)
        raise
    return record


# --------------------------------------------------------------------------- one process


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a service started right after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness probe: ``url`` answers 200 to a GET."""
    return lambda: _healthy(url)


def spawn(
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (so ``terminate`` reaches its whole tree), with
    stdout and stderr in ``log``; the working directory defaults to the project folder."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as fh:
        return subprocess.Popen(
            list(argv),
            cwd=str(cwd or project_dir()),
            env=dict(os.environ if env is None else env),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    log: Path,
    timeout: float,
    *,
    name: str = "service",
    poll: float = 0.3,
) -> None:
    """Wait until ``ready()`` is true; ``ServiceError`` with the log's last lines if the
    process exits first or ``timeout`` seconds pass (the process is left to the caller)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{name} exited with code {proc.returncode}: {_tail(log)}")
        if ready():
            return
        time.sleep(poll)
    raise ServiceError(f"{name} not ready after {timeout:.0f} s: {_tail(log)}")


def terminate(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a process started by ``spawn`` and its whole session: SIGTERM, then SIGKILL
    after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def launch(
    argv: Sequence[str],
    ready: Callable[[], bool],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 240.0,
    name: str = "service",
) -> subprocess.Popen[bytes]:
    """Start a service and wait until it is ready; on failure it is stopped and
    ``ServiceError`` says why. Stop it with ``terminate``."""
    proc = spawn(argv, log, env=env, cwd=cwd)
    try:
        wait_ready(proc, ready, log, timeout, name=name)
    except BaseException:
        terminate(proc)
        raise
    return proc


def _for_a_block(
    start: Callable[_P, subprocess.Popen[bytes]],
) -> Callable[_P, contextlib.AbstractContextManager[subprocess.Popen[bytes]]]:
    """``start`` as a context manager that terminates the process when the block ends."""

    @contextlib.contextmanager
    @functools.wraps(start)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> Iterator[subprocess.Popen[bytes]]:
        proc = start(*args, **kwargs)
        try:
            yield proc
        finally:
            terminate(proc)

    return run


started = _for_a_block(launch)
started.__name__ = started.__qualname__ = "started"
started.__doc__ = "``launch`` as a context manager (same arguments): the service runs for the ``with`` block."


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(settings: Settings, name: str, grace: float = 20.0) -> bool:
    """Stop one service and every process it spawned; True if something was running."""
    record = _read_pid(settings, name)
    proc = _alive(record)
    pid_file = _pid_file(settings, name)
    if proc is None:
        pid_file.unlink(missing_ok=True)
        return False
    procs = _tree(proc)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(alive, timeout=5)
    if alive:
        raise ServiceError(f"{name}: processes {[p.pid for p in alive]} did not stop")
    pid_file.unlink(missing_ok=True)
    return True


def up(settings: Settings, config: str | Path | None = None) -> list[dict]:
    """Start every planned service in order; on a failure, stop what this call started."""
    started: list[dict] = []
    try:
        for svc in plan(settings, config):
            started.append(start(settings, svc))
    except BaseException:
        for record in reversed(started):
            if not record.get("already_running"):
                stop(settings, record["name"])
        raise
    return started


def down(settings: Settings) -> list[str]:
    """Stop every service of this home (reverse start order); names of those that ran."""
    return [svc.name for svc in reversed(plan(settings)) if stop(settings, svc.name)]
