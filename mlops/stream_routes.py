"""The routes of one stream run: a route table plus the version in each slot, pinned at start.

The stream consumer decides per event with the same ``mlops.routing.route`` the online
service uses, keyed by the event's entity key (canary/ab are sticky per entity) and its
transaction id (shadow mirroring). ``StreamRoutes`` is what a run pins: validated once,
described in the run summary, and recorded as JSON in each output part's metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlops.errors import ConfigError
from mlops.registry_model import CHAMPION
from mlops.routing import InvalidRouteTable, Mode, RouteTable

PART_METADATA_KEY = b"mlops.routes"
"""Parquet key-value metadata key of a routed part's routes (JSON)."""


@dataclass(frozen=True)
class StreamRoutes:
    """A route table and the versions of ``stable`` and ``candidate`` (None: no candidate)."""

    table: RouteTable
    stable_version: int
    candidate_version: int | None = None

    def __post_init__(self) -> None:
        if self.routed and self.candidate_version is None:
            raise InvalidRouteTable(f"{self.table.mode.value} routes need a candidate version")

    @property
    def routed(self) -> bool:
        """Whether the candidate takes part (any mode but ``single``)."""
        return self.table.mode is not Mode.SINGLE

    def describe(self) -> str:
        """One line for logs and the run summary, e.g. ``canary 10.0% (salt r1): stable v1, candidate v2``."""
        t = self.table
        if not self.routed:
            return f"single: stable v{self.stable_version}"
        how = {
            Mode.SHADOW: f"shadow {t.mirror_pct}% mirrored (salt {t.salt})",
            Mode.CANARY: f"canary {t.weight_pct}% (salt {t.salt})",
            Mode.AB: f"ab {t.weight_pct}% (salt {t.salt})",
            Mode.BLUE_GREEN: f"blue_green active {t.active_slot}",
        }[t.mode]
        return f"{how}: stable v{self.stable_version}, candidate v{self.candidate_version}"

    def as_json(self) -> str:
        """The routes as a JSON object (the fields of the serving state)."""
        t = self.table
        return json.dumps(
            {
                "mode": t.mode.value,
                "weight_pct": t.weight_pct,
                "mirror_pct": t.mirror_pct,
                "salt": t.salt,
                "active_slot": t.active_slot,
                "stable_version": self.stable_version,
                "candidate_version": self.candidate_version,
            },
            sort_keys=True,
        )


def explicit_table(
    mode: str,
    weight_pct: float,
    mirror_pct: float,
    salt: str,
    active_slot: str,
    candidate_alias: str | None,
) -> RouteTable:
    """The route table of a run's explicit parameters, checked against the candidate alias.

    Raises ``InvalidRouteTable`` (one line) for a bad field, a routed mode without a
    candidate, or a candidate in ``single`` mode (where it would never be scored).
    """
    table = RouteTable(
        mode=mode,  # type: ignore[arg-type]  # validated by RouteTable
        weight_pct=weight_pct,
        mirror_pct=mirror_pct,
        salt=salt,
        active_slot=active_slot,  # type: ignore[arg-type]
    )
    if table.mode is Mode.SINGLE and candidate_alias:
        raise InvalidRouteTable(
            "route mode single never scores a candidate: drop the candidate alias or choose "
            "shadow, canary, ab or blue_green"
        )
    if table.mode is not Mode.SINGLE and not candidate_alias:
        raise InvalidRouteTable(f"route mode {table.mode.value} needs a candidate alias")
    return table


def run_table(
    follow_serving: bool,
    alias: str,
    candidate_alias: str | None,
    mode: str,
    weight_pct: float,
    mirror_pct: float,
    salt: str,
    active_slot: str,
) -> RouteTable | None:
    """The route table of a stream run's parameters; None when it follows the serving state.

    Following the serving state excludes every other alias and route parameter (the state
    pins both versions and the routes); otherwise see ``explicit_table``. Raises
    ``ConfigError`` in one line.
    """
    if follow_serving:
        given = (alias, candidate_alias, mode, weight_pct, mirror_pct, salt, active_slot)
        if given != (CHAMPION, None, "single", 0.0, 0.0, "", "stable"):
            raise ConfigError(
                "follow-serving takes the versions and routes from the serving state: set no alias, "
                "candidate alias or route option with it"
            )
        return None
    return explicit_table(mode, weight_pct, mirror_pct, salt, active_slot, candidate_alias)
