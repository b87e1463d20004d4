"""Starting a service and waiting until it is ready: one helper for the CLI, tests and bench,
exercised with a real HTTP server process on a free loopback port."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from adapters.services import (
    Service,
    ServiceError,
    free_port,
    http_ok,
    launch,
    start,
    started,
    stop,
    terminate,
)
from mlops.settings import Settings


def _http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_a_started_service_answers_and_is_gone_after_the_block(tmp_path: Path) -> None:
    """``started`` returns once the probe passes, and stops the whole session at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with started(_http_server(port), http_ok(url), tmp_path / "http.log", cwd=tmp_path, timeout=60) as proc:
        assert httpx.get(url, timeout=5).status_code == 200
    assert proc.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_a_service_that_exits_reports_its_exit_code_and_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad config: no model'); sys.exit(3)"]
    with pytest.raises(ServiceError, match=r"demo exited with code 3: bad config: no model"):
        launch(argv, lambda: False, tmp_path / "demo.log", cwd=tmp_path, timeout=60, name="demo")


def test_a_service_never_ready_is_stopped_after_the_timeout(tmp_path: Path) -> None:
    """A process that runs but never passes its probe is terminated, not left behind."""
    port = free_port()
    argv = _http_server(port)
    never = http_ok(f"http://127.0.0.1:{port}/no-such-health-check")
    log = tmp_path / "slow.log"
    with pytest.raises(ServiceError, match=r"slow not ready after 2 s"):
        launch(argv, never, log, cwd=tmp_path, timeout=2, name="slow")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    terminate_is_idempotent = launch(
        argv, http_ok(f"http://127.0.0.1:{port}/"), log, cwd=tmp_path, timeout=60
    )
    terminate(terminate_is_idempotent)
    terminate(terminate_is_idempotent)
    assert terminate_is_idempotent.poll() is not None


def test_a_platform_service_is_recorded_while_it_runs_and_stopped_by_name(tmp_path: Path) -> None:
    """``start`` (what ``mlops server up`` runs per service) waits for the health URL, keeps a
    pid record and is idempotent; ``stop`` ends it and removes the record."""
    settings = Settings(home=str(tmp_path / "home"))
    port = free_port()
    svc = Service("web", tuple(_http_server(port)), health_url=f"http://127.0.0.1:{port}/")
    record = start(settings, svc)
    try:
        assert httpx.get(svc.health_url, timeout=5).status_code == 200
        assert start(settings, svc)["already_running"] is True
    finally:
        assert stop(settings, "web") is True
    assert not (settings.run_dir / "web.pid.json").exists() and record["log"].endswith("web.log")
    with pytest.raises(httpx.ConnectError):
        httpx.get(svc.health_url, timeout=2)
