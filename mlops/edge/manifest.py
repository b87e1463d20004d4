"""Signed OTA metadata, after The Update Framework (TUF), and the rules a device applies to it.

Three kinds of signed metadata, each a JSON envelope ``{"signed": {...}, "signatures":
[{"keyid", "sig"}]}`` whose signatures (Ed25519) cover the canonical JSON of ``signed``
(sorted keys, no whitespace), so re-serialising an envelope never breaks it:

``root``             the trusted keys (key id -> public key; a key id is the sha256 of the raw
                     public key, so one key cannot pose as two) and two roles: ``root`` (the
                     offline keys that sign root metadata) and ``release`` (the online keys
                     that sign releases and timestamps), each with a threshold counted in
                     distinct keys; a version and an expiry. Devices pin a root at
                     provisioning. A rotation publishes root ``n+1`` signed by the root keys
                     of root ``n`` *and* by its own; a device walks the chain one version at
                     a time, so trust only ever passes from keys it already trusted.
``model-targets``    one release of a model: monotonically increasing ``version``, the model
                     file's ``length`` and ``sha256``, ``created``/``expires``, the device
                     classes it is for, the minimum runtime, the rollout cohort percentage and
                     salt, the expected outputs on the golden inputs (health check) and the
                     reference prediction distribution (telemetry gate): that of the last good
                     release, i.e. what the fleet serves now. Widening a rollout
                     re-signs the same version with a larger ``cohort_percent``. A rollback is
                     a *new* version whose target is the last good model's bytes
                     (``restores``): versions never go backwards.
``timestamp``        short-lived (hours), re-signed at every publish, cohort change and
                     refresh: which release is current (its version, and the length and
                     sha256 of the exact ``model-targets`` bytes served), with its own
                     increasing version. It is TUF's timestamp and snapshot roles in one.

What a device refuses, and why (``check_timestamp``, ``decide_update``,
``check_snapshot``, ``DownloadCheck``): a signature that does not verify with the keys of
the right role (tampering, or the wrong key), expired metadata (a freeze attack replays
old metadata to keep devices on a vulnerable model; the timestamp's short expiry bounds
how long), a timestamp or release version below the highest it has accepted (a rollback
attack), a release other than the one the current timestamp names (a superseded -- e.g.
rolled-back -- release replayed to a device that never saw the newer one), malformed
metadata (not JSON, NaN, huge numbers, deep nesting, over the size limit), and downloaded
bytes whose length or sha256 differ from the signed ones (a truncated, endless or
tampered download, cut off as soon as it passes the signed length). Every refusal carries
a code and a reason, and the device keeps serving its current model.
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
from pydantic import Field, ValidationError, model_validator

from mlops.edge.budget import runtime_tuple
from mlops.edge.cohorts import bucket
from mlops.edge.errors import MetadataInvalid, SignatureInvalid
from mlops.settings import StrictModel

SPEC_VERSION = "1.0"
HEX64 = r"^[0-9a-f]{64}$"
MAX_INT = 2**63 - 1  # versions, lengths and thresholds above this are malformed, not big
MAX_METADATA_BYTES = 1 << 20  # a metadata document larger than 1 MiB is refused unparsed
Role = Literal["root", "release"]

# --------------------------------------------------------------------------- canonical form and keys


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def public_bytes(key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The key's id: the sha256 (hex) of its raw public key, so an id names exactly one key."""
    return hashlib.sha256(public_bytes(key)).hexdigest()


def public_key(hex_key: str) -> Ed25519PublicKey:
    """The Ed25519 public key of its raw hex form; ``MetadataInvalid`` if it is not one."""
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError as exc:
        raise MetadataInvalid(f"not an Ed25519 public key: {exc}") from None


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data``, hex."""
    return hashlib.sha256(data).hexdigest()


def iso(t: datetime) -> str:
    """``t`` in UTC as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- metadata models


class RoleKeys(StrictModel):
    """Which keys may sign for a role, and how many distinct ones must."""

    keyids: tuple[str, ...] = Field(min_length=1)
    threshold: int = Field(1, ge=1, le=MAX_INT)

    @model_validator(mode="after")
    def _reachable(self) -> RoleKeys:
        if self.threshold > len(set(self.keyids)):
            raise ValueError(
                f"threshold {self.threshold} exceeds the {len(set(self.keyids))} distinct keys listed"
            )
        return self


class Roles(StrictModel):
    """The two roles: ``root`` signs root metadata (offline keys), ``release`` signs releases and timestamps."""

    root: RoleKeys
    release: RoleKeys


class RootMeta(StrictModel):
    """The keys devices trust, and for which role."""

    kind: Literal["root"] = "root"
    spec_version: str = SPEC_VERSION
    version: int = Field(ge=1, le=MAX_INT)
    expires: datetime
    keys: dict[str, str]  # key id (sha256 of the raw public key) -> raw public key, hex
    roles: Roles

    @model_validator(mode="after")
    def _ids_are_hashes_of_their_keys(self) -> RootMeta:
        for kid, hex_key in self.keys.items():
            try:
                raw = bytes.fromhex(hex_key)
            except ValueError:
                raise ValueError(f"key {kid[:16]}: not hex") from None
            if len(raw) != 32 or hashlib.sha256(raw).hexdigest() != kid:
                raise ValueError(f"key id {kid[:16]}... is not the sha256 of its public key")
        for role in ("root", "release"):
            missing = [k for k in getattr(self.roles, role).keyids if k not in self.keys]
            if missing:
                raise ValueError(f"role {role} names key {missing[0][:16]}... that is not listed in keys")
        return self

    def trusted(self, role: Role) -> dict[str, Ed25519PublicKey]:
        """The public keys allowed to sign for ``role``, by key id."""
        return {kid: public_key(self.keys[kid]) for kid in getattr(self.roles, role).keyids}

    def threshold(self, role: Role) -> int:
        """How many distinct keys of ``role`` must sign."""
        return getattr(self.roles, role).threshold

    def keyids(self, role: Role) -> tuple[str, ...]:
        """The key ids of ``role``."""
        return getattr(self.roles, role).keyids


class TargetFile(StrictModel):
    """The model file a release points at."""

    name: str
    length: int = Field(ge=1, le=MAX_INT)
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
    version: int = Field(ge=1, le=MAX_INT)
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


class SnapshotFile(StrictModel):
    """The exact release metadata a timestamp vouches for."""

    version: int = Field(ge=1, le=MAX_INT)
    length: int = Field(ge=1, le=MAX_METADATA_BYTES)
    sha256: str = Field(pattern=HEX64)


class TimestampMeta(StrictModel):
    """Short-lived statement of which release of a model is current (TUF's timestamp + snapshot)."""

    kind: Literal["timestamp"] = "timestamp"
    spec_version: str = SPEC_VERSION
    model: str
    version: int = Field(ge=1, le=MAX_INT)
    created: datetime
    expires: datetime
    release: SnapshotFile


def _validate(model: type[StrictModel], data: Mapping[str, Any], what: str) -> Any:
    try:
        return model.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise MetadataInvalid(f"{what}: {where}: {err['msg']}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise MetadataInvalid(f"{what}: cannot be read ({type(exc).__name__})") from None


# --------------------------------------------------------------------------- envelopes


def sign(signed: Mapping[str, Any], keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The envelope bytes of ``signed`` with one signature per key."""
    body = canonical(dict(signed))
    sigs = [{"keyid": key_id(k.public_key()), "sig": k.sign(body).hex()} for k in keys]
    return canonical({"signed": dict(signed), "signatures": sigs})


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(data: bytes, what: str = "metadata") -> Any:
    """Strict JSON of untrusted metadata; ``MetadataInvalid`` for anything a device should not parse.

    Refused: more than ``MAX_METADATA_BYTES``, invalid UTF-8 or JSON, NaN/Infinity, integers
    too long to convert, nesting deep enough to exhaust the parser.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise MetadataInvalid(f"{what} is {len(data):,} bytes, over the {MAX_METADATA_BYTES:,}-byte limit")
    try:
        return json.loads(data, parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataInvalid(f"{what} is not JSON ({exc.__class__.__name__})") from None
    except ValueError as exc:  # NaN/Infinity, or an integer over the digit limit
        raise MetadataInvalid(f"{what} is not acceptable JSON: {str(exc)[:120]}") from None
    except RecursionError:
        raise MetadataInvalid(f"{what} is nested too deeply") from None


def open_envelope(data: bytes) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """``(signed, signatures)`` of an envelope; ``MetadataInvalid`` if it is not one."""
    env = load_json(data)
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
    """Key ids of the trusted keys whose signature verifies; ``SignatureInvalid`` below ``threshold``.

    The threshold counts distinct public keys: one key listed under two ids, or signing
    twice, counts once.
    """
    try:
        body = canonical(dict(signed))
    except (ValueError, TypeError, RecursionError):
        raise MetadataInvalid("signed metadata cannot be put in canonical form") from None
    good: list[str] = []
    seen_keys: set[bytes] = set()
    bad: list[str] = []
    untrusted: list[str] = []
    for s in signatures:
        key = trusted.get(s["keyid"])
        if key is None:
            untrusted.append(s["keyid"][:16])
            continue
        try:
            key.verify(bytes.fromhex(s["sig"]), body)
        except (InvalidSignature, ValueError):
            bad.append(s["keyid"][:16])
            continue
        raw = public_bytes(key)
        if raw not in seen_keys:
            seen_keys.add(raw)
            good.append(s["keyid"])
    if len(seen_keys) >= threshold:
        return good
    parts = []
    if bad:
        parts.append(f"signature by key {', '.join(bad)} does not verify (content altered after signing?)")
    if untrusted:
        parts.append(f"signed by untrusted key {', '.join(untrusted[:3])}")
    if not signatures:
        parts.append("no signatures")
    if not parts:
        parts.append("the same key signed more than once")
    raise SignatureInvalid(
        f"{len(seen_keys)} of {threshold} required signatures (distinct keys) valid: " + "; ".join(parts)
    )


def parse_manifest(signed: Mapping[str, Any]) -> ModelManifest:
    """A release's ``signed`` part as a model; ``MetadataInvalid`` naming the first bad field."""
    return _validate(ModelManifest, signed, "release metadata")


def verified_manifest(data: bytes, root: RootMeta) -> ModelManifest:
    """A release whose signatures verify under ``root``; raises ``SignatureInvalid``/``MetadataInvalid``."""
    signed, sigs = open_envelope(data)
    verify_signatures(signed, sigs, root.trusted("release"), root.threshold("release"))
    return _validate(ModelManifest, signed, "release metadata")


def verified_timestamp(data: bytes, root: RootMeta) -> TimestampMeta:
    """A timestamp whose signatures verify with the release keys of ``root``."""
    signed, sigs = open_envelope(data)
    verify_signatures(signed, sigs, root.trusted("release"), root.threshold("release"))
    return _validate(TimestampMeta, signed, "timestamp metadata")


def parse_root(data: bytes) -> tuple[RootMeta, dict[str, Any], list[dict[str, str]]]:
    """A root envelope's model, ``signed`` part and signatures (not yet verified)."""
    signed, sigs = open_envelope(data)
    return _validate(RootMeta, signed, "root metadata"), signed, sigs


def self_signed_root(data: bytes) -> RootMeta:
    """A first root, verified by its own keys (trust on first use, at provisioning)."""
    root, signed, sigs = parse_root(data)
    verify_signatures(signed, sigs, root.trusted("root"), root.threshold("root"))
    return root


def update_root(trusted: RootMeta, newer: Sequence[bytes], now: datetime) -> RootMeta:
    """Walk root versions ``trusted.version + 1, + 2, ...``: each signed by the previous root keys and its own.

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
        verify_signatures(signed, sigs, current.trusted("root"), current.threshold("root"))  # old keys vouch
        verify_signatures(signed, sigs, root.trusted("root"), root.threshold("root"))  # new keys are held
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
    timestamp_version: int = 0  # highest timestamp version ever accepted: never decreases


Action = Literal["install", "adopt", "restore", "noop", "reject"]


@dataclass(frozen=True)
class UpdateDecision:
    """What a device does with a verified release, with a machine code and a reason."""

    action: Action
    code: str
    reason: str

    @property
    def rejected(self) -> bool:
        """Whether the device refuses the release."""
        return self.action == "reject"


def _refuse_replay(
    kind: str, meta: ModelManifest | TimestampMeta, device_model: str, accepted: int, now: datetime
) -> UpdateDecision | None:
    """The rejection of signed ``kind`` metadata that is expired, for another model, or older
    than version ``accepted`` the device already took; None when it is none of these."""
    if meta.expires <= now:
        return UpdateDecision(
            "reject",
            "expired",
            f"{kind} v{meta.version} expired at {iso(meta.expires)} (now {iso(now)}): "
            "stale metadata replayed (freeze attack?)",
        )
    if meta.model != device_model:
        return UpdateDecision(
            "reject", "wrong-model", f"{kind} is for model '{meta.model}', device runs '{device_model}'"
        )
    if meta.version < accepted:
        return UpdateDecision(
            "reject",
            "rollback",
            f"{kind} v{meta.version} is older than v{accepted} already accepted (rollback attack refused)",
        )
    return None


def decide_update(m: ModelManifest, d: DeviceView, now: datetime) -> UpdateDecision:
    """The update rules, applied to a release whose signature already verified."""
    refused = _refuse_replay("release", m, d.model, d.highest_version, now)
    if refused is not None:
        return refused
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


def check_timestamp(ts: TimestampMeta, d: DeviceView, now: datetime) -> UpdateDecision | None:
    """None when a verified timestamp may be trusted now; else the rejection (stale, older, other model)."""
    return _refuse_replay("timestamp", ts, d.model, d.timestamp_version, now)


def check_snapshot(data: bytes, release: ModelManifest, ts: TimestampMeta) -> UpdateDecision | None:
    """None when ``data`` is exactly the release metadata the current timestamp names; else the rejection."""
    named = ts.release
    if release.version != named.version or len(data) != named.length or sha256_hex(data) != named.sha256:
        return UpdateDecision(
            "reject",
            "superseded",
            f"release v{release.version} is not the current one (the timestamp names v{named.version}, "
            f"sha256 {named.sha256[:16]}...): a superseded release replayed",
        )
    return None


class DownloadCheck:
    """Checks a download against its signed target while it is read: never more than ``length`` bytes.

    ``feed`` each chunk as it arrives (it refuses the moment the total passes the signed
    length, so an endless or oversized download is cut off, not read to the end), then
    ``finish`` for the length and sha256 of the whole.
    """

    def __init__(self, target: TargetFile):
        self.target = target
        self.received = 0
        self._hash = hashlib.sha256()

    def wanted(self, chunk_size: int) -> int:
        """How many bytes to ask for next: at most one past the signed length, to detect an oversize."""
        return max(1, min(chunk_size, self.target.length + 1 - self.received))

    def feed(self, chunk: bytes) -> UpdateDecision | None:
        """Account for ``chunk``; the rejection if the download is now longer than signed."""
        self.received += len(chunk)
        if self.received > self.target.length:
            return UpdateDecision(
                "reject",
                "length",
                f"oversized download: more than the signed {self.target.length:,} bytes (cut off)",
            )
        self._hash.update(chunk)
        return None

    def finish(self) -> UpdateDecision | None:
        """None when the whole download is exactly the signed target; else the rejection."""
        if self.received != self.target.length:
            return UpdateDecision(
                "reject",
                "length",
                f"truncated download: {self.received:,} bytes, signed length {self.target.length:,}",
            )
        digest = self._hash.hexdigest()
        if digest != self.target.sha256:
            return UpdateDecision(
                "reject",
                "hash",
                f"sha256 {digest[:16]}... differs from signed {self.target.sha256[:16]}... (tampered bytes)",
            )
        return None


def check_download(data: bytes, target: TargetFile) -> UpdateDecision | None:
    """None when ``data`` is exactly the signed target; else the rejection."""
    check = DownloadCheck(target)
    return check.feed(data) or check.finish()
