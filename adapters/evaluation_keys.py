"""The Ed25519 key that signs training runs' evaluation records, and the keys the gate trusts.

``$MLOPS_HOME/keys/evaluation/signing-key.pem`` (PKCS8 PEM, mode 0600, folder 0700) is
created on first use; its public key is trusted by the promotion gate of this home, as are
``promotion.trusted_evaluation_keys`` (training workers elsewhere). A worker may sign with a
provided key file instead (``promotion.evaluation_signing_key``).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from adapters.files import create_new
from mlops.edge.errors import MetadataInvalid
from mlops.edge.manifest import key_id, public_bytes, public_key
from mlops.errors import ConfigError
from mlops.settings import Settings

KEY_FILE = "signing-key.pem"


def own_key_path(settings: Settings) -> Path:
    """Where this home's evaluation signing key lives."""
    return settings.evaluation_keys_dir / KEY_FILE


def _load(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"evaluation signing key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"evaluation signing key {path}: not a readable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"evaluation signing key {path}: not an Ed25519 key")
    return key


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The key training signs evaluation records with: the provided file, else this home's key,
    created on first use (of processes racing to create it, one wins and all use its key)."""
    if settings.promotion.evaluation_signing_key:
        return _load(Path(settings.promotion.evaluation_signing_key))
    path = own_key_path(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        create_new(path, pem, mode=0o600)
    return _load(path)


def trusted_keys(settings: Settings) -> dict[str, Ed25519PublicKey]:
    """Public keys whose evaluation records the gate accepts, by key id: this home's key (when it
    exists), the provided signing key's, and ``promotion.trusted_evaluation_keys``."""
    keys = [public_key_of(p) for p in _own_files(settings) if p.exists()]
    for hex_key in settings.promotion.trusted_evaluation_keys:
        try:
            keys.append(public_key(hex_key))
        except MetadataInvalid as exc:
            raise ConfigError(f"promotion.trusted_evaluation_keys: {exc}") from None
    return {key_id(k): k for k in keys}


def public_key_of(path: Path) -> Ed25519PublicKey:
    """The public half of the private key file at ``path``."""
    return _load(path).public_key()


def public_hex(path: str | Path) -> str:
    """The raw hex public key of the private key file at ``path`` (for ``promotion.trusted_evaluation_keys``)."""
    return public_bytes(public_key_of(Path(path))).hex()


def _own_files(settings: Settings) -> list[Path]:
    provided = settings.promotion.evaluation_signing_key
    return [own_key_path(settings), *([Path(provided)] if provided else [])]
