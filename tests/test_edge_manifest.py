"""Signed OTA metadata with real Ed25519: envelopes, key rotation, and the device-side update rules."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mlops.edge import manifest as m
from mlops.edge.errors import MetadataInvalid, SignatureInvalid

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def root_doc(
    version: int,
    keys: list[Ed25519PrivateKey],
    expires: datetime = NOW + timedelta(days=365),
    release: list[Ed25519PrivateKey] | None = None,
) -> dict:
    """Root metadata whose root role is ``keys`` and release role ``release`` (default: the same keys)."""
    release = keys if release is None else release
    return {
        "kind": "root",
        "spec_version": "1.0",
        "version": version,
        "expires": m.iso(expires),
        "keys": {m.key_id(k.public_key()): m.public_bytes(k.public_key()).hex() for k in [*keys, *release]},
        "roles": {
            "root": {"keyids": [m.key_id(k.public_key()) for k in keys], "threshold": 1},
            "release": {"keyids": [m.key_id(k.public_key()) for k in release], "threshold": 1},
        },
    }


def release_doc(version: int = 2, **over: object) -> dict:
    model = b"model bytes"
    doc = {
        "kind": "model-targets",
        "spec_version": "1.0",
        "model": "fraud",
        "version": version,
        "variant": "student",
        "source_version": 1,
        "restores": None,
        "created": m.iso(NOW - timedelta(hours=1)),
        "expires": m.iso(NOW + timedelta(days=7)),
        "target": {"name": "fraud.onnx", "length": len(model), "sha256": m.sha256_hex(model)},
        "device_classes": ["pos-terminal"],
        "min_runtime_version": "1.20.0",
        "cohort_percent": 100.0,
        "rollout_salt": "s",
        "golden": {"inputs": {"amount": [1.0]}, "expected": [0.1], "tolerance": 1e-4},
        "reference": {"edges": [0.0, 0.5, 1.0], "fractions": [0.5, 0.5]},
        "reference_version": 1,
    }
    return doc | over


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def root(key: Ed25519PrivateKey) -> m.RootMeta:
    return m.self_signed_root(m.sign(root_doc(1, [key]), [key]))


def device(**over: object) -> m.DeviceView:
    base = dict(
        device_id="dev-1",
        device_class="pos-terminal",
        runtime_version="1.32.0",
        model="fraud",
        current=m.Installed(1, "a" * 64),
        previous=None,
        highest_version=1,
    )
    return m.DeviceView(**(base | over))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- envelopes


def test_signed_release_verifies_even_after_reserialisation(key: Ed25519PrivateKey, root: m.RootMeta) -> None:
    """The signature covers canonical JSON, so pretty-printing the envelope does not break it."""
    env = m.sign(release_doc(), [key])
    assert m.verified_manifest(env, root).version == 2
    pretty = json.dumps(json.loads(env), indent=4).encode()
    assert m.verified_manifest(pretty, root).target.length == len(b"model bytes")


def test_altered_metadata_fails_its_signature(key: Ed25519PrivateKey, root: m.RootMeta) -> None:
    """Changing any signed field after signing (here the target hash) is detected."""
    env = json.loads(m.sign(release_doc(), [key]))
    env["signed"]["target"]["sha256"] = "0" * 64
    with pytest.raises(SignatureInvalid, match="does not verify"):
        m.verified_manifest(json.dumps(env).encode(), root)


def test_metadata_signed_with_the_wrong_key_is_refused(root: m.RootMeta) -> None:
    """A release signed by a key the device does not pin is refused, whatever key id it claims."""
    attacker = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureInvalid, match="untrusted key"):
        m.verified_manifest(m.sign(release_doc(), [attacker]), root)
    forged = json.loads(m.sign(release_doc(), [attacker]))
    forged["signatures"][0]["keyid"] = next(iter(root.keys))
    with pytest.raises(SignatureInvalid, match="does not verify"):
        m.verified_manifest(json.dumps(forged).encode(), root)


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"signed": {}, "signatures": "x"}'])
def test_malformed_metadata_is_refused(data: bytes, root: m.RootMeta) -> None:
    with pytest.raises(MetadataInvalid):
        m.verified_manifest(data, root)


def test_signed_but_incomplete_release_is_refused(key: Ed25519PrivateKey, root: m.RootMeta) -> None:
    doc = release_doc()
    del doc["target"]
    with pytest.raises(MetadataInvalid, match="target"):
        m.verified_manifest(m.sign(doc, [key]), root)


# --------------------------------------------------------------------------- key rotation


def test_key_rotation_is_followed_only_through_a_chain_vouched_for_by_trusted_keys(
    key: Ed25519PrivateKey, root: m.RootMeta
) -> None:
    """Root v2 signed by the old and new keys is adopted; then only the new key signs releases."""
    new = Ed25519PrivateKey.generate()
    v2 = m.sign(root_doc(2, [new]), [key, new])
    trusted = m.update_root(root, [v2], NOW)
    assert trusted.version == 2 and set(trusted.keys) == {m.key_id(new.public_key())}
    assert m.verified_manifest(m.sign(release_doc(), [new]), trusted).version == 2
    with pytest.raises(SignatureInvalid):
        m.verified_manifest(m.sign(release_doc(), [key]), trusted)  # the rotated-out key


def test_a_root_not_signed_by_the_previous_keys_is_refused(key: Ed25519PrivateKey, root: m.RootMeta) -> None:
    attacker = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureInvalid):
        m.update_root(root, [m.sign(root_doc(2, [attacker]), [attacker])], NOW)


def test_root_versions_cannot_skip_and_an_expired_root_is_refused(
    key: Ed25519PrivateKey, root: m.RootMeta
) -> None:
    with pytest.raises(MetadataInvalid, match="does not follow"):
        m.update_root(root, [m.sign(root_doc(3, [key]), [key])], NOW)
    with pytest.raises(MetadataInvalid, match="expired"):
        m.update_root(root, [], NOW + timedelta(days=400))


# --------------------------------------------------------------------------- update rules


def release(**over: object) -> m.ModelManifest:
    return m.ModelManifest.model_validate_json(json.dumps(release_doc(**over)))


def test_a_newer_release_for_this_device_is_installed() -> None:
    d = m.decide_update(release(), device(), NOW)
    assert (d.action, d.code) == ("install", "update")


def test_older_release_is_a_rollback_attack() -> None:
    """A correctly signed but older release is refused: versions never go backwards on a device."""
    d = m.decide_update(release(version=1), device(highest_version=2, current=m.Installed(2, "a" * 64)), NOW)
    assert d.rejected and d.code == "rollback" and "older than v2" in d.reason


def test_expired_release_is_a_freeze_attack() -> None:
    d = m.decide_update(release(), device(), NOW + timedelta(days=8))
    assert d.rejected and d.code == "expired" and "freeze" in d.reason


@pytest.mark.parametrize(
    ("over", "dev", "code"),
    [
        ({"cohort_percent": 0.0}, {}, "not-in-cohort"),
        ({"device_classes": ["kiosk"]}, {}, "device-class"),
        ({"min_runtime_version": "9.0"}, {}, "runtime"),
        ({"version": 1}, {}, "up-to-date"),
        ({"version": 2}, {"highest_version": 2, "failed_versions": frozenset({2})}, "failed-before"),
    ],
)
def test_releases_a_device_should_not_take_are_noops_with_a_reason(over: dict, dev: dict, code: str) -> None:
    d = m.decide_update(release(**over), device(**dev), NOW)
    assert (d.action, d.code) == ("noop", code)


def test_same_bytes_are_adopted_and_the_previous_bytes_restored_without_download() -> None:
    """A rollback release (a new version carrying the last good bytes) needs no download on devices that keep them."""
    sha = m.sha256_hex(b"model bytes")
    assert m.decide_update(release(), device(current=m.Installed(1, sha)), NOW).action == "adopt"
    restored = m.decide_update(
        release(version=3),
        device(current=m.Installed(2, "b" * 64), previous=m.Installed(1, sha), highest_version=2),
        NOW,
    )
    assert restored.action == "restore"


def test_downloads_must_match_the_signed_length_and_hash() -> None:
    """A truncated download and tampered bytes are each refused with their reason."""
    target = release().target
    assert m.check_download(b"model bytes", target) is None
    short = m.check_download(b"model", target)
    assert short is not None and short.code == "length" and "truncated" in short.reason
    bad = m.check_download(b"model BYTES", target)
    assert bad is not None and bad.code == "hash" and "tampered" in bad.reason


# --------------------------------------------------------------------------- keys, thresholds, roles


def test_a_key_id_is_the_sha256_of_the_public_key_and_a_root_cannot_claim_otherwise(
    key: Ed25519PrivateKey,
) -> None:
    """Key ids are derived from the key; a root listing a key under an id that is not its hash is malformed."""
    raw = m.public_bytes(key.public_key())
    assert m.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()
    doc = root_doc(1, [key])
    doc["keys"] = {"ab" * 32: raw.hex()}
    doc["roles"]["root"]["keyids"] = doc["roles"]["release"]["keyids"] = ["ab" * 32]
    with pytest.raises(MetadataInvalid, match="not the sha256 of its public key"):
        m.self_signed_root(m.sign(doc, [key]))


def test_a_threshold_counts_distinct_keys_not_key_ids_or_signatures(key: Ed25519PrivateKey) -> None:
    """One key listed under two ids, signing twice, does not meet a threshold of 2."""
    body = release_doc()
    sig = key.sign(m.canonical(body)).hex()
    pub = key.public_key()
    with pytest.raises(SignatureInvalid, match="1 of 2"):
        m.verify_signatures(
            body, [{"keyid": "a", "sig": sig}, {"keyid": "b", "sig": sig}], {"a": pub, "b": pub}, 2
        )
    kid = m.key_id(pub)
    with pytest.raises(SignatureInvalid, match="1 of 2"):
        m.verify_signatures(body, [{"keyid": kid, "sig": sig}] * 2, {kid: pub}, 2)
    doc = root_doc(1, [key])
    doc["roles"]["root"] = {"keyids": [kid, kid], "threshold": 2}
    with pytest.raises(MetadataInvalid, match="threshold 2 exceeds the 1 distinct keys"):
        m.self_signed_root(m.sign(doc, [key, key]))
    other = Ed25519PrivateKey.generate()
    both = {kid: pub, m.key_id(other.public_key()): other.public_key()}
    two = m.sign(body, [key, other])
    signed, sigs = m.open_envelope(two)
    assert len(m.verify_signatures(signed, sigs, both, 2)) == 2


def test_releases_are_signed_by_the_release_role_and_roots_by_the_root_role() -> None:
    """The offline root key cannot sign releases and the online release key cannot sign a root."""
    root_key, release_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    root = m.self_signed_root(m.sign(root_doc(1, [root_key], release=[release_key]), [root_key]))
    assert m.verified_manifest(m.sign(release_doc(), [release_key]), root).version == 2
    with pytest.raises(SignatureInvalid):
        m.verified_manifest(m.sign(release_doc(), [root_key]), root)
    attacker = Ed25519PrivateKey.generate()
    by_release_key = m.sign(root_doc(2, [attacker], release=[attacker]), [release_key, attacker])
    with pytest.raises(SignatureInvalid):
        m.update_root(root, [by_release_key], NOW)  # a stolen online key cannot hand trust to another key


# --------------------------------------------------------------------------- malformed metadata

DEEP = b'{"signed": ' + b"[" * 100_000 + b"]" * 100_000 + b', "signatures": []}'


@pytest.mark.parametrize(
    "data",
    [
        b'{"signed": {"version": NaN}, "signatures": []}',
        b'{"signed": {"version": Infinity}, "signatures": []}',
        b'{"signed": {"version": ' + b"9" * 5000 + b'}, "signatures": []}',
        DEEP,
        b'{"signed": {"pad": "' + b"x" * (2 << 20) + b'"}, "signatures": []}',
        b"\xff\xfe",
    ],
    ids=["nan", "infinity", "huge-integer", "deep-nesting", "oversized", "not-utf8"],
)
def test_hostile_metadata_is_refused_as_malformed_never_crashing(data: bytes, root: m.RootMeta) -> None:
    """NaN, integers past the digit limit, nesting deep enough to exhaust the parser and oversized
    documents are each a MetadataInvalid with a reason, not a ValueError or RecursionError."""
    for verify in (m.verified_manifest, m.verified_timestamp):
        with pytest.raises(MetadataInvalid):
            verify(data, root)


def test_signed_nan_or_huge_numbers_are_refused_after_the_signature(
    key: Ed25519PrivateKey, root: m.RootMeta
) -> None:
    """Even correctly signed, a NaN tolerance or a version past 2**63 is malformed metadata."""
    env = json.loads(m.sign(release_doc(), [key]))
    env["signed"]["golden"]["tolerance"] = float("nan")
    with pytest.raises(MetadataInvalid):
        m.verified_manifest(json.dumps(env).encode(), root)
    with pytest.raises(MetadataInvalid, match="version"):
        m.verified_manifest(m.sign(release_doc(version=2**70), [key]), root)


# --------------------------------------------------------------------------- timestamps, snapshots, downloads


def timestamp_doc(version: int = 5, release_version: int = 2, data: bytes = b"{}", **over: object) -> dict:
    doc = {
        "kind": "timestamp",
        "spec_version": "1.0",
        "model": "fraud",
        "version": version,
        "created": m.iso(NOW - timedelta(hours=1)),
        "expires": m.iso(NOW + timedelta(hours=23)),
        "release": {"version": release_version, "length": len(data), "sha256": m.sha256_hex(data)},
    }
    return doc | over


def test_a_stale_or_older_timestamp_is_refused(key: Ed25519PrivateKey, root: m.RootMeta) -> None:
    """An expired timestamp is a freeze attack, one older than the newest accepted a rollback."""
    ts = m.verified_timestamp(m.sign(timestamp_doc(), [key]), root)
    assert m.check_timestamp(ts, device(timestamp_version=5), NOW) is None
    stale = m.check_timestamp(ts, device(), NOW + timedelta(hours=24))
    assert stale is not None and stale.code == "expired" and "timestamp v5 expired" in stale.reason
    older = m.check_timestamp(ts, device(timestamp_version=6), NOW)
    assert older is not None and older.code == "rollback"
    other = m.check_timestamp(ts, device(model="churn"), NOW)
    assert other is not None and other.code == "wrong-model"


def test_a_release_other_than_the_one_the_timestamp_names_is_superseded(key: Ed25519PrivateKey) -> None:
    """A genuine, unexpired, newer-than-installed release is refused when the timestamp names another."""
    current = m.sign(release_doc(version=3), [key])
    replayed = m.sign(release_doc(version=2), [key])
    ts = m.TimestampMeta.model_validate_json(json.dumps(timestamp_doc(release_version=3, data=current)))
    assert m.check_snapshot(current, release(version=3), ts) is None
    bad = m.check_snapshot(replayed, release(version=2), ts)
    assert bad is not None and bad.code == "superseded" and "names v3" in bad.reason


def test_a_download_is_cut_off_as_soon_as_it_passes_the_signed_length() -> None:
    """The check runs while reading: it asks for at most one byte past the length and refuses then."""
    target = release().target
    check = m.DownloadCheck(target)
    assert check.wanted(1 << 16) == target.length + 1
    refused = check.feed(b"x" * (target.length + 1))
    assert refused is not None and refused.code == "length" and "oversized" in refused.reason
