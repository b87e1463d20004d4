"""`mlops edge` as a user runs it: keys, budgets and status without a flow; errors as one line and an exit code."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mlops.settings import Settings
from mlops_cli.main import app

RUNNER = CliRunner()


def test_keys_are_created_in_mlops_home_and_rotated(home: Settings) -> None:
    """`keys init` writes a 0600 offline root key, a 0600 online release key and root v1; `keys rotate`
    makes root v2 with a new release key, signed by the root key, and deletes the old release key."""
    first = RUNNER.invoke(app, ["edge", "keys", "init"])
    assert first.exit_code == 0, first.output
    assert "root v1" in first.output
    keys_dir = home.edge_dir / "keys"
    [root_pem] = list((keys_dir / "offline").glob("*.pem"))
    [release_pem] = list((keys_dir / "online").glob("*.pem"))
    assert root_pem.stat().st_mode & 0o777 == 0o600 and release_pem.stat().st_mode & 0o777 == 0o600
    assert root_pem.name != release_pem.name
    rotated = RUNNER.invoke(app, ["edge", "keys", "rotate"])
    assert rotated.exit_code == 0, rotated.output
    assert "root v1 -> v2" in rotated.output and "nothing served yet" in rotated.output
    assert not release_pem.exists() and len(list((keys_dir / "online").glob("*.pem"))) == 1
    assert root_pem.exists()
    root2 = json.loads((keys_dir / "root" / "2.root.json").read_text())
    assert [s["keyid"] for s in root2["signatures"]] == [root_pem.stem]  # vouched for by the root key
    shown = RUNNER.invoke(app, ["edge", "keys", "show"])
    assert "root v2 (versions [1, 2])" in shown.output and "release (threshold 1)" in shown.output
    again = RUNNER.invoke(app, ["edge", "keys", "rotate", "--root"])
    assert again.exit_code == 0, again.output
    assert not root_pem.exists() and len(list((keys_dir / "offline").glob("*.pem"))) == 1
    refreshed = RUNNER.invoke(app, ["edge", "refresh"])
    assert refreshed.exit_code == 0 and "nothing served yet" in refreshed.output


def test_rotating_with_the_root_key_offline_is_one_line_and_an_exit_code(home: Settings) -> None:
    """The root key is needed only to rotate: with it unmounted, rotation says where it looked."""
    assert RUNNER.invoke(app, ["edge", "keys", "init"]).exit_code == 0
    offline = home.edge_dir / "keys" / "offline"
    offline.rename(offline.with_name("elsewhere"))
    res = RUNNER.invoke(app, ["edge", "keys", "rotate"])
    assert res.exit_code == 8, res.output
    assert "root key" in res.output and "Traceback" not in res.output


def test_budget_files_are_validated_with_file_and_field_in_the_error(tmp_path: Path) -> None:
    ok = RUNNER.invoke(app, ["edge", "budget", "validate", "configs/edge/mobile-app.yaml"])
    assert ok.exit_code == 0 and "budget 'mobile-app'" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_sise_bytes: 10\n")
    res = RUNNER.invoke(app, ["edge", "budget", "validate", str(bad)])
    assert res.exit_code == 2
    assert "bad.yaml: limits.max_sise_bytes: Extra inputs are not permitted" in res.output.replace("\n", "")
    schema = RUNNER.invoke(app, ["edge", "budget", "schema"])
    assert schema.exit_code == 0 and "QuantizeSpec" in schema.output


def test_rotating_without_keys_is_one_line_and_an_exit_code(home: Settings) -> None:
    res = RUNNER.invoke(app, ["edge", "keys", "rotate"])
    assert res.exit_code == 8
    assert "no signing keys" in res.output and "Traceback" not in res.output


def test_status_of_an_empty_home_lists_no_releases(home: Settings) -> None:
    res = RUNNER.invoke(app, ["edge", "status"])
    assert res.exit_code == 0, res.output
    assert "releases (last good: v-)" in res.output


def test_status_lists_rollouts_recorded_before_the_shared_vocabulary_in_todays_words(home: Settings) -> None:
    """A rollout row written with the older OTA spelling (``rolled-back``) is listed as ``rolled_back``."""
    from adapters.edge_store import TelemetryStore, edge_paths

    old = {"rollout_id": "fraud-v2-old", "model": "fraud", "version": 2, "phase": "rolled-back"}
    TelemetryStore(edge_paths(home).telemetry).save_rollout("default", old | {"stages": [1.0], "stage": 0})
    res = RUNNER.invoke(app, ["edge", "status"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "fraud-v2-old" in res.output and "rolled_back" in res.output and "rolled-back" not in res.output
