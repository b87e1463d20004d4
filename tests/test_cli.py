"""The ``mlops`` command line as a user runs it: help everywhere, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import click
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from adapters.datasets import write_parquet
from mlops.datagen import generate
from mlops_cli.main import app
from tests.support import environ_restored
from tests.support.cli import run_cli

RUNNER = CliRunner()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append(prefix + (name,))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, prefix + (name,)))
    return out


COMMANDS = _commands(typer.main.get_command(app))  # type: ignore[arg-type]


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    """Every command and group answers --help with a description."""
    result = RUNNER.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def mlops(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    full_env = os.environ.copy() | {"COLUMNS": "200"} | (env or {})  # tables wide enough to read
    return run_cli(full_env, *args, timeout=timeout)


def test_invalid_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`mlops config validate` on a bad file prints one line naming file and field, exit code 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("dask:\n  n_workers: -1\n")
    result = RUNNER.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml: dask.n_workers" in lines[0]


def test_data_generate_writes_exactly_the_rows(tmp_path: Path) -> None:
    """`mlops data generate` writes the requested rows to Parquet; a non-Parquet target is refused."""
    out = tmp_path / "d.parquet"
    result = RUNNER.invoke(
        app, ["data", "generate", "--rows", "1234", "--out", str(out), "--seed", "3", "--drift", "0.5"]
    )
    assert result.exit_code == 0, result.output
    assert pq.ParquetFile(out).metadata.num_rows == 1234
    bad = RUNNER.invoke(app, ["data", "generate", "--rows", "10", "--out", str(tmp_path / "d.txt")])
    assert bad.exit_code == 3 and "must be a .parquet file" in bad.output
    assert not (tmp_path / "d.txt").exists()


def test_answering_an_approval_without_a_prefect_server_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused rollout lives on a Prefect server: without one for this home (no `mlops server
    up`, no prefect.api_url), `mlops rollout approve` says how to get one, exit 2."""
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = RUNNER.invoke(app, ["rollout", "approve", "00000000-0000-0000-0000-000000000000"])
    assert result.exit_code == 2, result.output
    assert "no Prefect server for" in result.output and "mlops server up" in result.output


def test_rollout_list_flags_an_approval_whose_deadline_passed_unrecorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollout still recorded as awaiting approval after its deadline (its run stopped while
    paused) is listed with the passed deadline and how to end it, not as still waiting."""
    from datetime import UTC, datetime, timedelta

    from mlops.rollout.machine import ApprovalRequest, Phase, start
    from mlops.rollout.plan import load_plan
    from mlops.settings import load_settings
    from tasks.rollout import save_status

    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    plan = load_plan(Path(__file__).parent / "plans" / "shadow-approval.yaml")
    then = datetime.now(UTC) - timedelta(hours=1)
    status = start(
        "r-stale",
        plan,
        model_name="fraud",
        stable_version=1,
        candidate_version=2,
        aliases={"champion": 1, "challenger": 2},
        now=then,
    )
    request = ApprovalRequest(
        rollout_id="r-stale",
        model_name="fraud",
        candidate_version=2,
        stable_version=1,
        requested_at=then,
        deadline=then + timedelta(minutes=2),
    )
    save_status(
        load_settings(), status.model_copy(update={"phase": Phase.AWAITING_APPROVAL, "approval": request})
    )
    result = RUNNER.invoke(app, ["rollout", "list"])
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert "r-stale awaiting_approval v2 vs v1" in line, result.output
    assert "passed with no outcome recorded" in line and "mlops rollout --resume r-stale" in line, (
        result.output
    )


@pytest.mark.slow
def test_train_on_bad_data_exits_nonzero_listing_expectations(tmp_path: Path, prefect_api: None) -> None:
    """`mlops train` on data with a missing column and out-of-range values exits 3, lists both, registers nothing.

    The CLI process talks to the session's Prefect API (as it would to a server), so it
    does not start a temporary one of its own; the demo test covers that path."""
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "home"
    data = tmp_path / "bad.parquet"
    frame = generate(2000, seed=2).drop(columns=["ip_risk_score"])
    frame.loc[::50, "hour_of_day"] = 99.0
    write_parquet([frame], data)
    api = PREFECT_API_URL.value()
    result = mlops(
        "train",
        "--data",
        str(data),
        env={"MLOPS_HOME": str(home), "MLOPS__PREFECT__API_URL": api, "PREFECT_API_URL": api},
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "expectations failed" in result.stderr
    assert "column 'ip_risk_score' is missing" in result.stderr
    assert "column 'hour_of_day': values must be between 0.0 and 23.0" in result.stderr
    assert "Traceback" not in result.stderr
    listing = mlops("registry", "list", env={"MLOPS_HOME": str(home)})
    assert listing.returncode == 0 and "has no versions" in listing.stdout


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_demo_end_to_end_on_embedded_defaults(tmp_path: Path) -> None:
    """`mlops demo` on a fresh MLOPS_HOME exits 0: v1 trained, scored, shipped to the edge,
    then v2 (passing the offline promotion gate) rolled out against the live service (the
    compressed demo plan) and promoted: v2 is champion, v1 previous-champion, every move in
    the history. Its eight steps are numbered in one sequence and timed, and the rollout's
    progress is printed as it happens (step, gates, samples collected vs needed). The stream
    step scores every published event with the champion and its window features, and a DuckDB
    query over the stream's parts counts them."""
    home = tmp_path / "home"
    env = {
        "MLOPS_HOME": str(home),
        "MLOPS__TRAINING__CANDIDATES": '[{"kind": "gradient_boosting", "n_estimators": 30}, {"kind": "logistic_regression"}]',
    }
    plan = Path(__file__).parent / "plans" / "fast-demo-e2e.yaml"
    result = mlops("demo", "--rows", "20000", "--rollout-plan", str(plan), env=env, timeout=2400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo summary" in result.stdout and ": succeeded (v2 vs v1" in result.stdout, result.stdout[-3000:]
    for k in range(1, 9):
        assert f"✓ [{k}/8] " in result.stdout, result.stdout[-3000:]
    assert "promotion gate: PASS" in result.stdout.split("✓ [7/8]")[1], result.stdout[-3000:]
    stream = result.stdout.split("✓ [3/8]")[1].split("✓ [4/8]")[0]
    assert "published 20,000 card transactions" in stream and "20,000 events -> 7 window features" in stream
    assert "stream_scores" in stream and " 20000 " in stream and "lag 0" in stream, stream
    rollout_lines = [line for line in result.stdout.splitlines() if " [2/6] shadow: running" in line]
    assert rollout_lines and "candidate_traffic" in rollout_lines[-1], result.stdout[-3000:]
    assert "total (wall)" in result.stdout
    listing = mlops("registry", "list", "--json", env=env)
    aliases = {v["version"]: set(v["aliases"]) for v in map(json.loads, listing.stdout.splitlines())}
    assert aliases == {1: {"previous-champion"}, 2: {"champion", "challenger"}}, listing.stdout
    history = mlops("registry", "history", env=env)
    assert history.returncode == 0 and "register" in history.stdout and "promote" in history.stdout
    stale = mlops(
        "promote",
        "--alias",
        "challenger",
        "--version",
        "1",
        "--expect-current",
        "7",
        "--reason",
        "x",
        env=env,
    )
    assert stale.returncode == 5 and "expected v7; nothing was moved" in stale.stderr
    for sub in ("mlflow.db", "registry_audit.db", "prefect", "data/train.parquet"):
        assert (home / sub).exists(), sub


def test_query_is_read_only_each_refusal_one_line_and_nonzero(tmp_path: Path) -> None:
    """`mlops query` answers a SELECT over the store; reading a file outside it, COPY TO, ATTACH,
    SET and several statements each end in one error line and exit code 3, changing nothing."""
    from datetime import UTC, date, datetime

    import pyarrow as pa

    from adapters import storage

    home = tmp_path / "home"
    day = date(2025, 3, 1)
    stage = storage.StagedRun.open(home, day, storage.new_run_id())
    part = stage.write_part(0, pa.table({"transaction_id": [1, 2, 3], "score": [0.1, 0.5, 0.9]}))
    now = datetime.now(UTC)
    stage.commit([part], storage.RunRecord("fraud", "1", "champion", None, 3, now, now, {}))
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    env = {"MLOPS_HOME": str(home)}

    ok = mlops("query", "SELECT count(*) AS n FROM scores", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "3" in ok.stdout

    # The refusals in this process (the same command and error handling, without an interpreter each).
    for sql in (
        f"SELECT * FROM read_csv('{tmp_path}/secret.csv')",
        f"COPY (SELECT * FROM scores) TO '{tmp_path}/out.csv'",
        f"ATTACH '{tmp_path}/other.duckdb' AS o",
        "SET enable_external_access = true",
        "SELECT 1; SELECT 2",
    ):
        with environ_restored():
            result = RUNNER.invoke(app, ["query", sql], env=env | {"COLUMNS": "200"})
        assert result.exit_code == 3, (sql, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (sql, result.stderr)
        assert "hunter2" not in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "secret.csv"]


def test_config_show_masks_tokens_uri_passwords_and_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlops config show` prints which secrets are set but never their values: the admin token,
    the password in a database URI (user and host kept), secret query parameters."""
    cfg = tmp_path / "platform.yaml"
    cfg.write_text(
        "mlflow:\n"
        "  tracking_uri: postgresql://mlflow:s3cr3t-db-pass@db.internal:5432/mlflow\n"
        "  audit_db_uri: postgresql://db.internal/audit?sslmode=require&password=s3cr3t-query-pass\n"
        "serving:\n"
        "  admin_token: s3cr3t-admin-token-0123456789\n"
        "  url: https://s3cr3t-url-token@serving.internal\n"
    )
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    result = RUNNER.invoke(app, ["config", "show", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "s3cr3t" not in result.output
    assert "postgresql://mlflow:***@db.internal:5432/mlflow" in result.output
    assert "sslmode=require&password=***" in result.output
    assert "admin_token: '***'" in result.output
    assert "https://***@serving.internal" in result.output


def test_redaction_leaves_plain_values_and_masks_secret_names() -> None:
    """Secret-named fields are masked wherever they nest; unset ones stay visibly unset."""
    from mlops.redact import redact

    data = {"a": {"api_key": "k", "token": None, "threads": 4}, "uris": ["sqlite:///x.db", "http://u:p@h/"]}
    assert redact(data) == {
        "a": {"api_key": "***", "token": None, "threads": 4},
        "uris": ["sqlite:///x.db", "http://u:***@h/"],
    }
