"""One temporary Prefect API server for a whole pytest-xdist run, shared by its workers.

Prefect's test harness starts a server (an SQLite database migrated from scratch) in each
process that uses it: about nine CPU-seconds each, paid by both workers of the fast suite.
Here the controller owns one such server instead. A worker whose collected tests run flows
asks for it by creating ``wanted`` in the run's folder; the controller's watcher thread then
starts the server (the command Prefect's harness runs) and writes its URL to ``url``; every
worker waits for the URL and the server's health check, and points Prefect at it. The
controller stops the server when the run ends. Without xdist (``-n 0``) a test process
starts Prefect's own harness as before.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FOLDER_ENV = "MLOPS_TEST_PREFECT_FOLDER"
WANTED, URL, FAILED = "wanted", "url", "failed"
STARTUP_S = 180.0


class SharedPrefectServer:
    """The controller's side: start the server the first time a worker asks, stop it at the end."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mlops-prefect-api-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="prefect-api-watcher", daemon=True)

    def start_watching(self) -> None:
        """Publish the folder to the workers (through the environment they inherit) and watch it."""
        os.environ[FOLDER_ENV] = str(self.folder)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            if (self.folder / WANTED).exists():
                try:
                    self._start()
                except Exception as exc:  # reported to the waiting workers, not lost in a thread
                    (self.folder / FAILED).write_text(f"{type(exc).__name__}: {exc}")
                return

    def _start(self) -> None:
        from adapters.services import free_port

        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.submodule_search_locations, "prefect is not installed"
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        port = free_port()
        db = self.folder / "prefect.db"
        env = os.environ | {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory"]
        argv += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--log-level", "error", "--lifespan", "on"]
        with open(self.folder / "server.log", "wb") as log:  # the server keeps its own copy
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        tmp = self.folder / f"{URL}.tmp"
        tmp.write_text(f"http://127.0.0.1:{port}/api")
        tmp.rename(self.folder / URL)

    def stop(self) -> None:
        """Stop the watcher and the server, and remove the folder."""
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.environ.pop(FOLDER_ENV, None)
        shutil.rmtree(self.folder, ignore_errors=True)


def ask_for_shared_api() -> None:
    """From a worker whose tests run flows: have the controller start the server (idempotent)."""
    folder = os.environ.get(FOLDER_ENV)
    if folder:
        (Path(folder) / WANTED).touch()


def shared_api_url(folder: Path, timeout: float = STARTUP_S) -> str:
    """The shared server's API URL once it answers its health check."""
    ask_for_shared_api()
    deadline = time.monotonic() + timeout
    while not (folder / URL).exists():
        if (folder / FAILED).exists():
            raise RuntimeError(f"the shared Prefect API did not start: {(folder / FAILED).read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the shared Prefect API was not started within {timeout:.0f} s")
        time.sleep(0.05)
    url = (folder / URL).read_text()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            log = (folder / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the shared Prefect API at {url} is not healthy: {log}")
        time.sleep(0.1)


@contextmanager
def prefect_api_for_tests() -> Iterator[None]:
    """Point Prefect at the run's shared server, or start Prefect's own test harness."""
    folder = os.environ.get(FOLDER_ENV)
    if not folder:
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=int(STARTUP_S)):
            yield
        return
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = shared_api_url(Path(folder))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        # As Prefect's harness does: code running in a context copied earlier sees it too.
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield
