"""Rollout cohorts by stable hash.

A device's bucket is a number in [0, 100) derived from the sha256 of the release's salt and
the device id: the same device always lands in the same bucket for a release, so widening
the cohort from 1% to 10% keeps the first 1% in it, and a new release (a new salt) picks a
different first 1% of the fleet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def bucket(device_id: str, salt: str) -> float:
    """The device's position in [0, 100) for this salt."""
    digest = hashlib.sha256(f"{salt}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def in_cohort(device_id: str, salt: str, percent: float) -> bool:
    """Whether the device is inside the ``percent`` cohort for this salt."""
    return bucket(device_id, salt) < percent


def cohort(device_ids: Iterable[str], salt: str, percent: float) -> list[str]:
    """The devices of ``device_ids`` inside the ``percent`` cohort, in the given order."""
    return [d for d in device_ids if in_cohort(d, salt, percent)]
