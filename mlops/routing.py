"""Traffic-router decisions: which variant answers a request, and whether it is mirrored.

Pure logic, run once per online request by the serving layer. A ``RouteTable`` is an
immutable description of the current rollout step; ``route(table, ...)`` turns it plus
the request's keys into a ``RouteDecision``. The serving layer holds one reference to the
current table and swaps it whole, so a change of routes (a canary ramp, a blue-green flip)
is atomic: a request sees either the old table or the new one, never a mix.

Modes (variants are always ``stable`` and ``candidate``):

``single``
    Everything goes to ``stable``.
``shadow``
    ``stable`` answers every request; a deterministic ``mirror_pct`` share of requests
    (hashed by request id) is also copied to ``candidate`` off the response path.
``canary``
    ``weight_pct`` percent of *entities* (hashed by entity key, salted per rollout) go to
    ``candidate``. An entity's bucket in ``[0, 10000)`` never changes within a rollout and
    it is on ``candidate`` iff ``bucket < weight_pct * 100``, so ramping the weight up only
    ever moves entities from ``stable`` to ``candidate``, never back.
``ab``
    The same sticky hashed split, read as an experiment: the decision records the arm. A
    forced variant (the ``x-mlops-variant`` header) overrides the split.
``blue_green``
    Everything goes to ``active_slot``; ``RouteTable.flipped()`` swaps it.

A forced variant is honoured in ``canary``, ``ab`` and ``blue_green`` (to reach the idle
slot before a flip); in ``single`` and ``shadow`` the candidate must never answer, so it
is ignored and the reason says so. An honoured one is marked ``forced``: the serving layer
logs it so, and the rollout gates and the A/B test never count it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from hashlib import blake2b
from typing import Final, Literal, NamedTuple, Protocol

from mlops.errors import ConfigError

Variant = Literal["stable", "candidate"]
STABLE: Final = "stable"
CANDIDATE: Final = "candidate"
VARIANTS: Final = (STABLE, CANDIDATE)

BUCKETS: Final = 10_000
"""Hash buckets per rollout; a percentage maps to ``pct * 100`` buckets (0.01 % steps)."""

FORCE_HEADER: Final = "x-mlops-variant"
"""Request header whose value (``stable`` or ``candidate``) forces a variant."""

_MAX_SALT_BYTES: Final = 256


class Mode(StrEnum):
    """How a table splits traffic between ``stable`` and ``candidate``."""

    SINGLE = "single"
    SHADOW = "shadow"
    CANARY = "canary"
    AB = "ab"
    BLUE_GREEN = "blue_green"


_HASHED_MODES: Final = frozenset({Mode.SHADOW, Mode.CANARY, Mode.AB})
_SPLIT_MODES: Final = frozenset({Mode.CANARY, Mode.AB})
_FORCIBLE_MODES: Final = frozenset({Mode.CANARY, Mode.AB, Mode.BLUE_GREEN})


class RouteFields(Protocol):
    """The fields of a route table as configs and APIs carry them."""

    mode: str
    weight_pct: float
    mirror_pct: float
    salt: str
    active_slot: Variant


class InvalidRouteTable(ConfigError, ValueError):
    """A route table (or a forced variant) has a value outside what routing accepts.

    Raised when a ``RouteTable`` is built, so a bad table never reaches a request; also a
    ``ValueError`` so callers validating input generically catch it.
    """


class RouteDecision(NamedTuple):
    """Where one request goes.

    ``variant`` answers the request; ``mirror`` says whether a copy also goes to
    ``candidate`` off the response path (shadow mode only); ``reason`` is a short
    human-readable account for logs and the prediction log; ``forced`` says the caller
    chose the variant (an honoured ``x-mlops-variant``), so the answer is no evidence
    about the variant and gates leave it out.
    """

    variant: Variant
    mirror: bool
    reason: str
    forced: bool = False


def _pct_to_buckets(name: str, pct: float) -> int:
    if isinstance(pct, bool) or not isinstance(pct, int | float):
        raise InvalidRouteTable(f"{name} must be a number, got {type(pct).__name__} {pct!r}")
    if not math.isfinite(pct) or not 0 <= pct <= 100:
        raise InvalidRouteTable(f"{name} must be between 0 and 100, got {pct!r}")
    buckets = round(pct * (BUCKETS // 100))
    if not math.isclose(buckets, pct * (BUCKETS // 100), abs_tol=1e-6):
        raise InvalidRouteTable(f"{name} has at most two decimals (0.01 % steps), got {pct!r}")
    return buckets


@dataclass(frozen=True, slots=True)
class RouteTable:
    """One immutable routing step of a rollout.

    ``weight_pct`` (canary, ab) is the percentage of entities on ``candidate``;
    ``mirror_pct`` (shadow) the percentage of requests mirrored; ``salt`` (required by the
    hashed modes, normally the rollout id) decorrelates one rollout's buckets from the
    next, so the same users are not always the first canaries; ``active_slot``
    (blue_green) is the variant receiving all traffic. A field that does not apply to
    ``mode`` must keep its default, so a table never carries a setting it ignores.
    """

    mode: Mode = Mode.SINGLE
    weight_pct: float = 0.0
    mirror_pct: float = 0.0
    salt: str = ""
    active_slot: Variant = STABLE

    # Derived once at construction; route() only reads them.
    _prefix: bytes = field(init=False, repr=False, compare=False)
    _threshold: int = field(init=False, repr=False, compare=False)
    _hash_by: int = field(init=False, repr=False, compare=False)
    _forcible: bool = field(init=False, repr=False, compare=False)
    _decisions: tuple[RouteDecision, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            mode = Mode(self.mode)
        except ValueError:
            allowed = ", ".join(m.value for m in Mode)
            raise InvalidRouteTable(f"mode must be one of {allowed}, got {self.mode!r}") from None
        object.__setattr__(self, "mode", mode)
        weight = _pct_to_buckets("weight_pct", self.weight_pct)
        mirror = _pct_to_buckets("mirror_pct", self.mirror_pct)
        if not isinstance(self.salt, str):
            raise InvalidRouteTable(f"salt must be a string, got {type(self.salt).__name__}")
        if self.active_slot not in VARIANTS:
            raise InvalidRouteTable(f"active_slot must be 'stable' or 'candidate', got {self.active_slot!r}")
        if weight and mode not in _SPLIT_MODES:
            raise InvalidRouteTable(f"weight_pct applies to canary and ab, not {mode.value}")
        if mirror and mode is not Mode.SHADOW:
            raise InvalidRouteTable(f"mirror_pct applies to shadow, not {mode.value}")
        if self.active_slot != STABLE and mode is not Mode.BLUE_GREEN:
            raise InvalidRouteTable(f"active_slot applies to blue_green, not {mode.value}")
        salt = self.salt.encode()
        if mode in _HASHED_MODES and not salt:
            raise InvalidRouteTable(f"{mode.value} needs a non-empty salt (the rollout id)")
        if len(salt) > _MAX_SALT_BYTES:
            raise InvalidRouteTable(f"salt is longer than {_MAX_SALT_BYTES} bytes")
        object.__setattr__(self, "_prefix", salt + b"\x00")
        object.__setattr__(self, "_threshold", mirror if mode is Mode.SHADOW else weight)
        hash_by = _HASH_ENTITY if mode in _SPLIT_MODES else _HASH_NONE
        object.__setattr__(self, "_hash_by", _HASH_REQUEST if mode is Mode.SHADOW else hash_by)
        object.__setattr__(self, "_forcible", mode in _FORCIBLE_MODES)
        object.__setattr__(
            self, "_decisions", _decisions_for(mode, self.weight_pct, self.mirror_pct, self.active_slot)
        )

    @classmethod
    def of(cls, spec: RouteFields) -> RouteTable:
        """The table of anything carrying its five fields (a rollout's route effect, the admin
        API's routes), ``mode`` spelled as a string."""
        return cls(
            mode=Mode(spec.mode),
            weight_pct=spec.weight_pct,
            mirror_pct=spec.mirror_pct,
            salt=spec.salt,
            active_slot=spec.active_slot,
        )

    def ramped(self, weight_pct: float) -> RouteTable:
        """The same canary/ab rollout (same salt, so same buckets) at another weight."""
        if self.mode not in _SPLIT_MODES:
            raise InvalidRouteTable(f"only canary and ab tables ramp, this is {self.mode.value}")
        return dataclasses.replace(self, weight_pct=weight_pct)

    def flipped(self) -> RouteTable:
        """The blue-green table with the other slot active."""
        if self.mode is not Mode.BLUE_GREEN:
            raise InvalidRouteTable(f"only blue_green tables flip, this is {self.mode.value}")
        other: Variant = CANDIDATE if self.active_slot == STABLE else STABLE
        return dataclasses.replace(self, active_slot=other)

    def bucket(self, key: str) -> int:
        """The key's bucket in ``[0, BUCKETS)`` under this table's salt."""
        digest = blake2b(self._prefix + key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % BUCKETS


# Indices into RouteTable._decisions; every decision a table can return is built once.
_PRIMARY, _SECONDARY, _BY_REQUEST_PRIMARY, _BY_REQUEST_SECONDARY = 0, 1, 2, 3
_FORCED_STABLE, _FORCED_CANDIDATE, _FORCE_IGNORED = 4, 5, 6
# What route() hashes, per table: nothing, the request id, or the entity key.
_HASH_NONE, _HASH_REQUEST, _HASH_ENTITY = 0, 1, 2


def _decisions_for(
    mode: Mode, weight_pct: float, mirror_pct: float, active_slot: Variant
) -> tuple[RouteDecision, ...]:
    forced = (
        RouteDecision(STABLE, False, f"{mode.value}: forced by {FORCE_HEADER}", True),
        RouteDecision(CANDIDATE, False, f"{mode.value}: forced by {FORCE_HEADER}", True),
    )
    if mode is Mode.SINGLE:
        d = RouteDecision(STABLE, False, "single: stable only")
        ignored = RouteDecision(STABLE, False, "single: forced variant ignored, stable only")
        return (d, d, d, d, *forced, ignored)
    if mode is Mode.BLUE_GREEN:
        d = RouteDecision(active_slot, False, f"blue_green: active slot is {active_slot}")
        return (d, d, d, d, *forced, d)
    if mode is Mode.SHADOW:
        keep = RouteDecision(STABLE, False, f"shadow: request not sampled ({mirror_pct}% mirrored)")
        copy = RouteDecision(STABLE, True, f"shadow: request sampled for mirror ({mirror_pct}%)")
        ignored = RouteDecision(STABLE, False, "shadow: forced variant ignored, stable answers")
        return (keep, copy, keep, copy, *forced, ignored)
    # canary / ab: the secondary decision is "this entity is on the candidate".
    m = mode.value
    return (
        RouteDecision(STABLE, False, f"{m}: entity bucket outside candidate {weight_pct}%"),
        RouteDecision(CANDIDATE, False, f"{m}: entity bucket inside candidate {weight_pct}%"),
        RouteDecision(STABLE, False, f"{m}: no entity key, request outside {weight_pct}%"),
        RouteDecision(CANDIDATE, False, f"{m}: no entity key, request inside {weight_pct}%"),
        *forced,
        forced[0],  # unused: forcing is honoured in canary and ab
    )


def route(
    table: RouteTable,
    entity_key: str | None,
    request_id: str,
    forced_variant: str | None = None,
) -> RouteDecision:
    """Decide which variant answers one request, and whether it is mirrored.

    ``entity_key`` (a user or card id) makes canary/ab sticky; without one the request id
    is hashed instead (the split share holds, stickiness does not). ``request_id`` drives
    shadow sampling, so a retried request is mirrored or not the same way.
    ``forced_variant`` is the raw value of the ``x-mlops-variant`` header, if any; an
    unknown value raises ``InvalidRouteTable`` (the service answers 400).
    """
    decisions = table._decisions
    if forced_variant is not None:
        if forced_variant == STABLE or forced_variant == CANDIDATE:
            if table._forcible:
                return decisions[_FORCED_STABLE if forced_variant == STABLE else _FORCED_CANDIDATE]
            return decisions[_FORCE_IGNORED]
        raise InvalidRouteTable(f"{FORCE_HEADER} must be 'stable' or 'candidate', got {forced_variant!r}")
    hash_by = table._hash_by
    if hash_by == _HASH_NONE:
        return decisions[_PRIMARY]
    if hash_by == _HASH_REQUEST:
        key, offset = request_id, 0
    elif entity_key is None:
        key, offset = request_id, _BY_REQUEST_PRIMARY
    else:
        key, offset = entity_key, 0
    digest = blake2b(table._prefix + key.encode(), digest_size=8).digest()
    inside = int.from_bytes(digest, "little") % BUCKETS < table._threshold
    return decisions[offset + inside]
