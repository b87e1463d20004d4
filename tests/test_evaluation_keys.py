"""The evaluation signing key: private on disk, created once however many processes race for it."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path
from typing import Any

from adapters.evaluation_keys import own_key_path, signing_key, trusted_keys
from mlops.edge.manifest import key_id, public_bytes
from mlops.settings import Settings, load_settings


def _first_use(home: str, start: Any, out: Any) -> None:
    settings = load_settings(environ={"MLOPS_HOME": home})
    start.wait()
    out.put(public_bytes(signing_key(settings).public_key()).hex())


def test_the_signing_key_is_private_and_concurrent_first_uses_end_with_one_key(tmp_path: Path) -> None:
    """Given a home without a key, when six processes use it for the first time at once, then
    exactly one key file exists (mode 0600, folder 0700, no temporary files left), every
    process signs with it, and the gate of that home trusts it."""
    home = str(tmp_path / "home")
    ctx = multiprocessing.get_context("spawn")  # fresh processes: no lock held by a test thread at fork
    start, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_first_use, args=(home, start, out)) for _ in range(6)]
    for p in procs:
        p.start()
    keys = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    settings = load_settings(environ={"MLOPS_HOME": home})
    path = own_key_path(settings)
    assert len(set(keys)) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert public_bytes(signing_key(settings).public_key()).hex() == keys[0]
    assert [public_bytes(k).hex() for k in trusted_keys(settings).values()] == keys[:1]


def test_a_home_without_a_key_trusts_only_the_declared_keys(tmp_path: Path) -> None:
    """The gate creates no key: a home whose training never signed trusts only
    promotion.trusted_evaluation_keys, by key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().public_key()
    settings: Settings = load_settings(
        environ={
            "MLOPS_HOME": str(tmp_path / "home"),
            "MLOPS__PROMOTION__TRUSTED_EVALUATION_KEYS": f"['{public_bytes(other).hex()}']",
        }
    )
    assert list(trusted_keys(settings)) == [key_id(other)]
    assert not own_key_path(settings).exists()
