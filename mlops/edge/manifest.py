"""Signed OTA metadata, after The Update Framework (TUF), and the rules a device applies to it.

Two kinds of signed metadata, each a JSON envelope ``{"signed": {...}, "signatures":
[{"keyid", "sig"}]}`` whose signatures (Ed25519) cover the canonical JSON of ``signed``
(sorted keys, no whitespace), so re-serialising an envelope never breaks it:

``root``             the trusted signing keys (key id -> public key) and how many must sign
                     (``threshold``), with a version and an expiry. Devices pin a root at
                     provisioning. A key rotation publishes root ``n+1`` signed by the keys of
                     root ``n`` *and* by its own keys; a device walks the chain one version
                     at a time, so trust only ever passes from keys it already trusted.
``model-targets``    one release of a model: monotonically increasing ``version``, the model
                     file's ``length`` and ``sha256``, ``created``/``expires``, the device
                     classes it is for, the minimum runtime, the rollout cohort percentage and
                     salt, the expected outputs on the golden inputs (health check) and the
                     reference prediction distribution (telemetry gate): that of the last good
                     release, i.e. what the fleet serves now. Widening a rollout
                     re-signs the same version with a larger ``cohort_percent``. A rollback is
                     a *new* version whose target is the last good model's bytes
                     (``restores``): versions never go backwards.

What a device refuses, and why (``decide_update``, ``check_download``): a signature that
does not verify with a pinned key (tampering, or the wrong key), expired metadata (a
freeze attack replays old metadata to keep devices on a vulnerable model), a version below
the highest it has accepted (a rollback attack), and downloaded bytes whose length or
sha256 differ from the signed ones (a truncated or tampered download). Every refusal
carries a code and a reason, and the device keeps serving its current model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import Field, ValidationError

from mlops.edge.budget import runtime_tuple
from mlops.edge.cohorts import bucket
from mlops.edge.errors import MetadataInvalid, SignatureInvalid
from mlops.settings import StrictModel

SPEC_VERSION = "1.0"
HEX64 = r"^[0-9a-f]{64}$"

# --------------------------------------------------------------------------- canonical form and keys


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:16]


def public_key(hex_key: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError as exc:
        raise MetadataInvalid(f"not an Ed25519 public key: {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- metadata models


class RootMeta(StrictModel):
    """The keys devices trust to sign model metadata."""

    kind: Literal["root"] = "root"
    spec_version: str = SPEC_VERSION
    version: int = Field(ge=1)
    expires: datetime
    keys: dict[str, str]  # key id -> raw public key, hex
    threshold: int = Field(1, ge=1)

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        return {kid: public_key(hex_key) for kid, hex_key in self.keys.items()}


class TargetFile(StrictModel):
    """The model file a release points at."""

    name: str
    length: int = Field(ge=1)
    sha256: str = Field(pattern=HEX64)


class Golden(StrictModel):
    """Health check: golden input rows and the publisher's probabilities for them."""

    inputs: dict[str, tuple[float | str, ...]]  # column -> values (the feature contract)
    expected: tuple[float, ...] = Field(min_length=1)
    tolerance: float = Field(gt=0)


class Reference(StrictModel):
    """The publisher's prediction distribution: bin edges and the share of rows in each bin."""

    edges: tuple[float, ...] = Field(min_length=2)
    fractions: tuple[float, ...] = Field(min_length=1)


class ModelManifest(StrictModel):
    """One signed release of a model (TUF's targets role, for one target)."""

    kind: Literal["model-targets"] = "model-targets"
    spec_version: str = SPEC_VERSION
    model: str
    version: int = Field(ge=1)
    variant: str
    source_version: int | None = None  # registry version of the champion it was built from
    restores: int | None = None  # rollback release: the version whose bytes it brings back
    created: datetime
    expires: datetime
    target: TargetFile
    device_classes: tuple[str, ...] = Field(min_length=1)
    min_runtime_version: str
    cohort_percent: float = Field(ge=0, le=100)
    rollout_salt: str
    golden: Golden
    reference: Reference  # the prediction distribution devices are compared with
    reference_version: int | None = None  # the release it was measured on (the last good one, or this one)


def _validate(model: type[StrictModel], data: Mapping[str, Any], what: str) -> Any:
    try:
        return model.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise MetadataInvalid(f"{what}: {where}: {err['msg']}") from None


# --------------------------------------------------------------------------- envelopes


def sign(signed: Mapping[str, Any], keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The envelope bytes of ``signed`` with one signature per key."""
    body = canonical(dict(signed))
    sigs = [{"keyid": key_id(k.public_key()), "sig": k.sign(body).hex()} for k in keys]
    return canonical({"signed": dict(signed), "signatures": sigs})


def open_envelope(data: bytes) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """``(signed, signatures)`` of an envelope; ``MetadataInvalid`` if it is not one."""
    try:
        env = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataInvalid(f"metadata is not JSON ({exc.__class__.__name__})") from None
    if (
        not isinstance(env, dict)
        or not isinstance(env.get("signed"), dict)
        or not isinstance(env.get("signatures"), list)
    ):
        raise MetadataInvalid("metadata is not a signed envelope ({'signed': ..., 'signatures': [...]})")
    sigs = [
        s
        for s in env["signatures"]
        if isinstance(s, dict) and isinstance(s.get("keyid"), str) and isinstance(s.get("sig"), str)
    ]
    return env["signed"], sigs


def verify_signatures(
    signed: Mapping[str, Any],
    signatures: Sequence[Mapping[str, str]],
    trusted: Mapping[str, Ed25519PublicKey],
    threshold: int,
) -> list[str]:
    """Key ids of the trusted keys whose signature verifies; ``SignatureInvalid`` below ``threshold``."""
    body = canonical(dict(signed))
    good: list[str] = []
    bad: list[str] = []
    untrusted: list[str] = []
    for s in signatures:
        key = trusted.get(s["keyid"])
        if key is None:
            untrusted.append(s["keyid"])
            continue
        try:
            key.verify(bytes.fromhex(s["sig"]), body)
        except (InvalidSignature, ValueError):
            bad.append(s["keyid"])
            continue
        if s["keyid"] not in good:
            good.append(s["keyid"])
    if len(good) >= threshold:
        return good
    parts = []
    if bad:
        parts.append(f"signature by key {', '.join(bad)} does not verify (content altered after signing?)")
    if untrusted:
        parts.append(f"signed by untrusted key {', '.join(untrusted)}")
    if not signatures:
        parts.append("no signatures")
    raise SignatureInvalid(f"{len(good)} of {threshold} required signatures valid: " + "; ".join(parts))


def parse_manifest(signed: Mapping[str, Any]) -> ModelManifest:
    """A release's ``signed`` part as a model; ``MetadataInvalid`` naming the first bad field."""
    return _validate(ModelManifest, signed, "release metadata")


def verified_manifest(data: bytes, root: RootMeta) -> ModelManifest:
    """A release whose signatures verify under ``root``; raises ``SignatureInvalid``/``MetadataInvalid``."""
    signed, sigs = open_envelope(data)
    verify_signatures(signed, sigs, root.trusted(), root.threshold)
    return _validate(ModelManifest, signed, "release metadata")


def parse_root(data: bytes) -> tuple[RootMeta, dict[str, Any], list[dict[str, str]]]:
    signed, sigs = open_envelope(data)
    return _validate(RootMeta, signed, "root metadata"), signed, sigs


def self_signed_root(data: bytes) -> RootMeta:
    """A first root, verified by its own keys (trust on first use, at provisioning)."""
    root, signed, sigs = parse_root(data)
    verify_signatures(signed, sigs, root.trusted(), root.threshold)
    return root


def update_root(trusted: RootMeta, newer: Sequence[bytes], now: datetime) -> RootMeta:
    """Walk root versions ``trusted.version + 1, + 2, ...``: each signed by the previous keys and its own.

    Raises ``SignatureInvalid`` if a step is not vouched for by the keys trusted before it,
    ``MetadataInvalid`` if versions skip or the resulting root has expired.
    """
    current = trusted
    for data in newer:
        root, signed, sigs = parse_root(data)
        if root.version != current.version + 1:
            raise MetadataInvalid(
                f"root version {root.version} does not follow trusted version {current.version}"
            )
        verify_signatures(signed, sigs, current.trusted(), current.threshold)  # the old keys vouch
        verify_signatures(signed, sigs, root.trusted(), root.threshold)  # the new keys are held
        current = root
    if current.expires <= now:
        raise MetadataInvalid(f"root v{current.version} expired at {iso(current.expires)}")
    return current


# --------------------------------------------------------------------------- device rules


@dataclass(frozen=True)
class Installed:
    """A model on a device: its release version and the sha256 of its bytes."""

    version: int
    sha256: str


@dataclass(frozen=True)
class DeviceView:
    """What the update rules need to know about a device."""

    device_id: str
    device_class: str
    runtime_version: str
    model: str
    current: Installed | None
    previous: Installed | None
    highest_version: int  # highest release version ever accepted: never decreases
    failed_versions: frozenset[int] = frozenset()


Action = Literal["install", "adopt", "restore", "noop", "reject"]


@dataclass(frozen=True)
class UpdateDecision:
    """What a device does with a verified release, with a machine code and a reason."""

    action: Action
    code: str
    reason: str

    @property
    def rejected(self) -> bool:
        return self.action == "reject"


def decide_update(m: ModelManifest, d: DeviceView, now: datetime) -> UpdateDecision:
    """The update rules, applied to a release whose signature already verified."""
    if m.expires <= now:
        return UpdateDecision(
            "reject",
            "expired",
            f"release v{m.version} expired at {iso(m.expires)} (now {iso(now)}): stale metadata replayed (freeze attack?)",
        )
    if m.model != d.model:
        return UpdateDecision(
            "reject", "wrong-model", f"release is for model '{m.model}', device runs '{d.model}'"
        )
    if m.version < d.highest_version:
        return UpdateDecision(
            "reject",
            "rollback",
            f"release v{m.version} is older than v{d.highest_version} already accepted (rollback attack refused)",
        )
    if d.device_class not in m.device_classes:
        return UpdateDecision(
            "noop", "device-class", f"release is for {', '.join(m.device_classes)}, not {d.device_class}"
        )
    if runtime_tuple(d.runtime_version) < runtime_tuple(m.min_runtime_version):
        return UpdateDecision(
            "noop", "runtime", f"runtime {d.runtime_version} < required {m.min_runtime_version}"
        )
    if m.version == d.highest_version:
        if m.version in d.failed_versions:
            return UpdateDecision(
                "noop",
                "failed-before",
                f"v{m.version} failed its health check here; waiting for a newer release",
            )
        return UpdateDecision("noop", "up-to-date", f"v{m.version} already accepted")
    b = bucket(d.device_id, m.rollout_salt)
    if b >= m.cohort_percent:
        return UpdateDecision(
            "noop", "not-in-cohort", f"bucket {b:.2f} not in the {m.cohort_percent:g}% cohort of v{m.version}"
        )
    if d.current is not None and d.current.sha256 == m.target.sha256:
        return UpdateDecision("adopt", "same-bytes", f"v{m.version} has the bytes already installed")
    if d.previous is not None and d.previous.sha256 == m.target.sha256:
        return UpdateDecision(
            "restore",
            "previous-bytes",
            f"v{m.version} restores the kept previous model (v{d.previous.version})",
        )
    return UpdateDecision("install", "update", f"v{m.version} ({m.variant}) for cohort {m.cohort_percent:g}%")


def check_download(data: bytes, target: TargetFile) -> UpdateDecision | None:
    """None when ``data`` is exactly the signed target; else the rejection."""
    if len(data) != target.length:
        what = "truncated download" if len(data) < target.length else "oversized download"
        return UpdateDecision(
            "reject", "length", f"{what}: {len(data):,} bytes, signed length {target.length:,}"
        )
    digest = sha256_hex(data)
    if digest != target.sha256:
        return UpdateDecision(
            "reject",
            "hash",
            f"sha256 {digest[:16]}... differs from signed {target.sha256[:16]}... (tampered bytes)",
        )
    return None
