"""``mlops tenants``: create the tenants of a multi-tenant online service."""

from __future__ import annotations

from typing import Annotated

import typer

from mlops_cli.common import ConfigOpt, console, handle_errors

tenants_app = typer.Typer(help="Tenants of the online service (serving.tenants).", no_args_is_help=True)


@tenants_app.command("add")
@handle_errors
def add(
    name: Annotated[str, typer.Argument(help="Tenant name: lower-case letters, digits, '_' and single '-'.")],
    config: ConfigOpt = None,
) -> None:
    """Create a tenant and print its token once (only its SHA-256 is stored)."""
    from mlops.settings import load_settings
    from mlops.tenancy import tenant_model_name
    from serving.tenants import add_tenant, tenants_dir

    settings = load_settings(config)
    token = add_tenant(settings, name)
    typer.echo(token)
    model = tenant_model_name(settings.serving.model_name or settings.training.model_name, name)
    console.print(
        f"tenant '{name}' created ({tenants_dir(settings) / name}.sha256). The token above is shown only "
        f"now. Train its model with `mlops train --tenant {name}` (registered as '{model}').",
        style="dim",
        highlight=False,
    )


@tenants_app.command("list")
@handle_errors
def list_(config: ConfigOpt = None) -> None:
    """Names of the tenants created in this MLOPS_HOME."""
    from mlops.settings import load_settings
    from serving.tenants import list_tenants

    for name in list_tenants(load_settings(config)):
        typer.echo(name)


def register(app: typer.Typer) -> None:
    """Add ``mlops tenants`` to the main command."""
    app.add_typer(tenants_app, name="tenants")
