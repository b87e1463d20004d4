"""Registry vocabulary and pure helpers: aliases, URIs, version records, audit entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

ModelAlias = Literal["champion", "challenger", "previous-champion"]  # the aliases the platform moves
ALIASES: tuple[str, ...] = get_args(ModelAlias)
CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = ALIASES


class _Any:
    """Sentinel: a compare-and-set that accepts whatever the alias points at now."""

    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()
ExpectCurrent = int | None | _Any  # None means "the alias must not exist yet"


def model_uri(name: str, alias: str | None = None, version: int | None = None) -> str:
    """``models:/name@alias`` or ``models:/name/version``."""
    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias or version")
    return f"models:/{name}@{alias}" if alias is not None else f"models:/{name}/{version}"


def parse_expect(text: str | None) -> ExpectCurrent:
    """CLI form of an expectation: absent -> ANY, ``none`` -> unset, digits -> version."""
    if text is None:
        return ANY
    if text.strip().lower() in {"none", "unset", "-"}:
        return None
    if not text.strip().isdigit():
        raise ValueError(f"expected a version number or 'none', got {text!r}")
    return int(text)


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version as the platform sees it."""

    name: str
    version: int
    run_id: str | None
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    created_ms: int = 0
    source: str = ""


@dataclass(frozen=True)
class AliasMove:
    """One entry of the alias audit history."""

    model: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    action: str
    run_id: str | None = None
    at: str = ""
    seq: int = 0

    def describe(self) -> str:
        """One line for the history: alias, from and to version, action, actor and reason."""
        src = "-" if self.from_version is None else f"v{self.from_version}"
        dst = "-" if self.to_version is None else f"v{self.to_version}"
        return f"{self.alias}: {src} -> {dst} ({self.action}) by {self.actor}: {self.reason}"


def plan_promotion(
    alias: str,
    target: int,
    current: dict[str, int],
) -> list[tuple[str, int | None, int]]:
    """The alias moves a promotion makes, in order: ``(alias, from, to)``.

    Promoting to ``champion`` first keeps the outgoing champion as ``previous-champion``
    so that a rollback is one alias move away. Moving an alias to where it already is
    makes no move.
    """
    moves: list[tuple[str, int | None, int]] = []
    old = current.get(alias)
    if old == target:
        return moves
    if alias == CHAMPION and old is not None:
        moves.append((PREVIOUS_CHAMPION, current.get(PREVIOUS_CHAMPION), old))
    moves.append((alias, old, target))
    return moves
