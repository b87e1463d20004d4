"""What the admin API sets and returns: routes plus the version in each slot.

``DesiredState`` has the fields of the rollout's route effect (``mode``, ``weight_pct``,
``mirror_pct``, ``salt``, ``active_slot``, ``stable_version``, ``candidate_version``), so a
rollout applies an effect by sending it as is. Applying a desired state is absolute and
therefore idempotent: sending the same state twice changes nothing the second time.

The last applied state is also persisted (``$MLOPS_HOME/run/serving-state.json``, written
atomically), so a restarted service comes back in the rollout step it was in instead of
silently reverting to the champion alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from adapters.files import atomic_write
from mlops.errors import ConfigError
from mlops.routing import RouteTable
from mlops.settings import Settings, StrictModel

STATE_FILE = "serving-state.json"


class RoutesSpec(StrictModel):
    """A routing table (see ``mlops.routing.RouteTable`` for what each field means)."""

    mode: Literal["single", "shadow", "canary", "ab", "blue_green"] = "single"
    weight_pct: float = Field(0.0, ge=0, le=100)
    mirror_pct: float = Field(0.0, ge=0, le=100)
    salt: str = Field("", max_length=256)
    active_slot: Literal["stable", "candidate"] = "stable"

    def table(self) -> RouteTable:
        """The routing table these fields describe (validated by ``RouteTable``)."""
        return RouteTable.of(self)

    @classmethod
    def of(cls, table: RouteTable) -> RoutesSpec:
        """The fields of a routing table."""
        return cls(
            mode=table.mode.value,
            weight_pct=float(table.weight_pct),
            mirror_pct=float(table.mirror_pct),
            salt=table.salt,
            active_slot=table.active_slot,
        )


class DesiredState(RoutesSpec):
    """Routes plus the version each slot serves (``candidate_version=None``: slot empty)."""

    stable_version: int = Field(ge=1)
    candidate_version: int | None = Field(None, ge=1)


class SlotRequest(StrictModel):
    """Load a version into a slot: by ``version``, or by registry ``alias`` (resolved now).
    ``{"version": null}`` empties the candidate slot."""

    version: int | None = Field(None, ge=1)
    alias: str | None = Field(None, min_length=1, max_length=128)


class PreloadRequest(StrictModel):
    """Load a version into the model pool without giving it a slot."""

    version: int = Field(ge=1)


def state_path(settings: Settings) -> Path:
    """Where the applied serving state of this instance is persisted."""
    return settings.run_dir / STATE_FILE


def save_state(
    path: Path, model_name: str, desired: DesiredState, generation: int, applied_key: str | None
) -> None:
    """Persist the applied state atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "model_name": model_name,
        "generation": generation,
        "applied_key": applied_key,
        "state": desired.model_dump(mode="json"),
    }
    atomic_write(path, json.dumps(data, indent=1).encode(), mode=0o644)


def load_state(path: Path, model_name: str) -> tuple[DesiredState, int] | None:
    """The persisted state for ``model_name`` and its generation, if any."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path}: unreadable serving state ({exc}); delete it to start from the registry aliases"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: invalid serving state (not a JSON object); delete it to start from the registry aliases"
        )
    if data.get("model_name") != model_name:
        return None
    try:
        return DesiredState.model_validate_json(json.dumps(data.get("state"))), int(data.get("generation", 0))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "state"
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(
            f"{path}: invalid serving state (state.{where}: {err['msg']}{more}); "
            "delete it to start from the registry aliases"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{path}: invalid serving state ({exc}); delete it to start from the registry aliases"
        ) from None
