"""`mlops server up|down|status` and `mlops deploy`: the long-running side of the platform."""

from __future__ import annotations

import os
import subprocess
from typing import Annotated

import typer
from rich.table import Table

from mlops_cli.common import ConfigOpt, console, handle_errors, settings_for

server_app = typer.Typer(
    help="Start and stop the local Prefect server + worker and MLflow server.", no_args_is_help=True
)


@server_app.command("up")
@handle_errors
def server_up(config: ConfigOpt = None) -> None:
    """Start a Prefect server (SQLite), a process worker for the pool and an MLflow server on loopback."""
    from adapters import services

    settings = settings_for(config)
    with console.status("starting services (the first Prefect start migrates its database)"):
        records = services.up(settings, config)
    for r in records:
        state = "already running" if r.get("already_running") else "started"
        console.print(f"[green]✓[/] {r['name']:<15} {state:<16} pid {r['pid']:<7} {r.get('url') or ''}")
    console.print(f"pid files and logs: {settings.run_dir}")
    console.print(
        f"commands of this MLOPS_HOME now use the Prefect server at {services.prefect_api_url(settings)}"
    )


@server_app.command("down")
@handle_errors
def server_down(config: ConfigOpt = None) -> None:
    """Stop exactly the services `mlops server up` started for this MLOPS_HOME (with their child processes)."""
    from adapters import services

    settings = settings_for(config)
    stopped = services.down(settings)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@server_app.command("status")
@handle_errors
def server_status(config: ConfigOpt = None) -> None:
    """Which services of this MLOPS_HOME run, with pid and URL."""
    from adapters import services

    settings = settings_for(config)
    alive = services.running(settings)
    table = Table(title=f"services of {settings.home_path}")
    for col in ("service", "state", "pid", "url"):
        table.add_column(col)
    for svc in services.plan(settings):
        rec = alive.get(svc.name)
        table.add_row(
            svc.name, "running" if rec else "stopped", str(rec["pid"]) if rec else "", svc.url or ""
        )
    console.print(table)


@handle_errors
def deploy(
    config: ConfigOpt = None,
    name: Annotated[
        list[str] | None,
        typer.Option("--name", "-n", help="Only these deployments (default: all in prefect.yaml)."),
    ] = None,
) -> None:
    """Register the deployments of prefect.yaml (schedules, parameters, work pool) with the Prefect server."""
    from adapters import services
    from mlops.errors import ConfigError

    settings = settings_for(config)
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise ConfigError("no Prefect server: run `mlops server up` or set prefect.api_url")
    selection = [a for n in name for a in ("--name", n)] if name else ["--all"]
    argv = [services._bin("prefect"), "--no-prompt", "deploy", *selection]
    env = os.environ | {"MLOPS_PROJECT_DIR": str(services.project_dir()), "PREFECT_API_URL": api}
    with console.status(f"deploying to {api}"):
        result = subprocess.run(argv, cwd=services.project_dir(), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-6:])
        raise services.ServiceError(f"prefect deploy failed (exit {result.returncode}): {tail}")
    deployed = [
        line.split("'")[1] for line in result.stdout.splitlines() if "Deployment '" in line and "'" in line
    ]
    for d in deployed:
        console.print(f"[green]✓[/] deployed {d}")
    console.print(
        f"work pool: {settings.prefect.work_pool}; trigger runs from the UI at {api.removesuffix('/api')}"
    )


def register(app: typer.Typer) -> None:
    """Add ``mlops server`` and ``mlops deploy`` to the CLI."""
    app.add_typer(server_app, name="server")
    app.command("deploy")(deploy)
