"""`mlops serve` (the online service in the foreground) and `mlops serving ...` (its admin API)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from mlops_cli.common import ConfigOpt, console, handle_errors, settings_for

serving_app = typer.Typer(
    help="Inspect and change the running online service (routes, slots).", no_args_is_help=True
)

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="Service URL (default: serving.url, else services.host and serving_port)."),
]
KeyOpt = Annotated[
    str | None, typer.Option("--idempotency-key", help="Repeat-safe key: a retry with it is applied once.")
]


@handle_errors
def serve(
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", min=1, max=65535, help="Port (default: services.serving_port)."),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Interface (default: services.host, loopback).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the online service (BentoML) in the foreground: /predict, OIP v2, /feedback, /metrics, admin API.

    Loads the model versions behind the serving aliases (champion; challenger when
    configured) from the registry of this MLOPS_HOME, or the routes and slots it last
    applied. Ctrl-C or SIGTERM stops it after in-flight requests are answered.
    """
    from adapters.services import project_dir, serving_command, serving_environment
    from serving.auth import ensure_feedback_token, ensure_token, feedback_token_path, token_path

    settings = settings_for(config)
    ensure_token(settings)
    ensure_feedback_token(settings)
    argv = serving_command(settings, host, port)
    env = os.environ | serving_environment(settings)
    if config:
        env["MLOPS_CONFIG"] = str(Path(config).resolve())
    where = f"http://{host or settings.services.host}:{port or settings.services.serving_port}"
    console.print(
        f"serving {settings.serving.model_name or settings.training.model_name} at {where} "
        f"(state: {settings.home_path})"
    )
    if not settings.serving.admin_token:
        console.print(f"admin token: {token_path(settings)}")
    if not settings.serving.feedback_token:
        console.print(f"feedback token (give it to the label pipeline): {feedback_token_path(settings)}")
    os.chdir(project_dir())
    os.execve(argv[0], list(argv), env)


def _client(config: str | None, url: str | None):
    from serving.client import ServingClient

    settings = settings_for(config)
    return ServingClient.for_settings(settings, base_url=url)


def _print_state(state: dict) -> None:
    console.print_json(json.dumps(state))


@serving_app.command("state")
@handle_errors
def serving_state(url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Current routes, slots (versions) and model pool of the running service."""
    _print_state(_client(config, url).state())


@serving_app.command("routes")
@handle_errors
def serving_routes(
    mode: Annotated[str, typer.Argument(help="single, shadow, canary, ab or blue_green.")],
    weight: Annotated[
        float, typer.Option("--weight", help="canary/ab: percent of entities on the candidate.")
    ] = 0.0,
    mirror: Annotated[float, typer.Option("--mirror", help="shadow: percent of requests mirrored.")] = 0.0,
    salt: Annotated[
        str, typer.Option("--salt", help="canary/ab/shadow: hashing salt (the rollout id).")
    ] = "",
    active: Annotated[
        str, typer.Option("--active", help="blue_green: the slot receiving all traffic.")
    ] = "stable",
    key: KeyOpt = None,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Change the routing table (slots unchanged)."""
    routes = {"mode": mode, "weight_pct": weight, "mirror_pct": mirror, "salt": salt, "active_slot": active}
    _print_state(_client(config, url).set_routes(routes, key=key))


@serving_app.command("load")
@handle_errors
def serving_load(
    slot: Annotated[str, typer.Argument(help="stable or candidate.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Model version to load.")] = None,
    alias: Annotated[
        str | None, typer.Option("--alias", help="Load the version this registry alias points at.")
    ] = None,
    key: KeyOpt = None,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Load a version into a slot (routes unchanged); neither option empties the candidate slot."""
    _print_state(_client(config, url).load_slot(slot, version=version, alias=alias, key=key))


@serving_app.command("flip")
@handle_errors
def serving_flip(key: KeyOpt = None, url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """Blue-green: move all traffic to the other slot (the old one stays loaded)."""
    _print_state(_client(config, url).flip(key=key))


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command and the ``serving`` command group to the ``mlops`` CLI."""
    app.command("serve")(serve)
    app.add_typer(serving_app, name="serving")
