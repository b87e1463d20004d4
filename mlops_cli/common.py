"""Shared CLI plumbing: settings loading, error translation, progress display."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mlops.errors import PlatformError
from mlops.settings import Settings, load_settings

# Off a terminal (CI logs, pipes) tables get room instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
console = Console(stderr=False, highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file (default: $MLOPS_CONFIG, else built-in defaults).",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Registered model (default: from config).", show_default=False),
]

_state: dict[str, Any] = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    """Show Prefect's INFO logs on the terminal and progress as plain lines instead of a spinner."""
    _state["verbose"] = verbose


def settings_for(config: str | None) -> Settings:
    """Load settings once and wire this process's backends to them."""
    from adapters.runtime import configure
    from adapters.services import active_prefect_api

    settings = load_settings(config)
    configure(settings)
    # A Prefect server started by `mlops server up` for this home takes over from the
    # temporary per-process API, so runs show up in its UI.
    if not settings.prefect.api_url:
        api = active_prefect_api(settings)
        if api:
            os.environ["PREFECT_API_URL"] = api
    # Prefect keeps INFO logs for its API (the UI); the terminal shows our own progress.
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO" if _state["verbose"] else "CRITICAL"
    # Prefect reads its settings from the environment once, when it is first imported; a
    # command that imported it before this point would still use the values from before
    # (no API URL: a temporary API instead of the server).
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()
    return settings


def handle_errors(fn: F) -> F:
    """Turn platform errors into one readable line on stderr and the error's exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PlatformError as exc:
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


class _StatusHandler(logging.Handler):
    """Shows each flow/task log line as the live status text (and keeps notable ones)."""

    def __init__(self, status: Any):
        super().__init__(level=logging.INFO)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().splitlines()[0][:160]
        except Exception:
            return
        self.status.update(f"[cyan]{msg}")


@contextmanager
def progress(title: str) -> Iterator[None]:
    """A live spinner fed by the flow's own log lines."""
    if _state["verbose"] or not sys.stdout.isatty():
        console.print(f"[bold]{title}[/]")
        yield
        return
    with console.status(f"[bold]{title}[/]") as status:
        handler = _StatusHandler(status)
        loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
        for lg in loggers:
            lg.addHandler(handler)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
