"""Hostile and malformed inputs around the window-feature pipelines.

* ``mlops stream query`` runs SQL typed by a user over a consumer group's committed parts:
  a query that writes, attaches, copies to a file, reads any file but those parts (system
  files, another group's parts, a path climbing out of the folder, DuckDB's own spill
  folder), reaches the network, or installs or loads an extension is refused in one line
  with a non-zero exit, and no file anywhere changes.
* A ``--feature-history`` for batch scoring that lacks a column, has a column of another
  type, is not Parquet/CSV or cannot be read is one ``DataError`` line, non-zero exit, and
  leaves no output.
"""

from __future__ import annotations

import hashlib
import os
from datetime import date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from mlops.datagen import generate
from mlops.errors import DataError
from mlops.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
FEATURES_YAML = REPO / "configs" / "features.yaml"
DAY = date(2026, 1, 2)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``root``: size, mtime (ns) and content digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return out


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


# --------------------------------------------------------------------------- stream query


@pytest.fixture
def stream_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An MLOPS_HOME with two committed parts of group ``scorer``, a part of another group, a
    secret file, and a file in DuckDB's default spill folder (``.tmp`` of the current folder)."""
    from flows.stream import output_dir
    from tasks.stream import write_part

    home = tmp_path / "home"
    monkeypatch.setenv("MLOPS_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    out = output_dir(settings, "transactions", "scorer")
    write_part(out, pa.table({"offset": [0, 1], "decision": [True, False]}), 0, 2)
    write_part(out, pa.table({"offset": [2], "decision": [True]}), 2, 3)
    other = write_part(
        output_dir(settings, "transactions", "other"), pa.table({"offset": [0], "card": ["4111"]}), 0, 1
    )
    (home / "secret.csv").write_text("key,value\napi,hunter2\n")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "leak.csv").write_text("key,value\napi,hunter2\n")
    return {"root": tmp_path, "home": home, "out": out, "other": other}


HOSTILE = {
    "insert": ("INSERT INTO stream_scores VALUES (9, true)", "INSERT statement refused"),
    "create": ("CREATE TABLE t AS SELECT * FROM stream_scores", "CREATE statement refused"),
    "drop": ("DROP VIEW stream_scores", "DROP statement refused"),
    "attach": ("ATTACH '{home}/x.duckdb' AS x", "ATTACH statement refused"),
    "copy": ("COPY stream_scores TO '{home}/copy.csv'", "COPY statement refused"),
    "copy after a select": ("SELECT 1; COPY (SELECT 1) TO '{home}/copy.csv'", "2 statements"),
    "export": ("EXPORT DATABASE '{home}/dump'", "EXPORT statement refused"),
    "install": ("INSTALL httpfs", "statement refused"),
    "load": ("LOAD httpfs", "statement refused"),
    "set": ("SET enable_external_access = true", "SET statement refused"),
    "passwd": ("SELECT * FROM read_csv('/etc/passwd')", 'Cannot access file "/etc/passwd"'),
    "passwd as text": ("SELECT * FROM read_text('/etc/passwd')", "Cannot access file"),
    "secret in home": ("SELECT * FROM read_csv('{home}/secret.csv')", "Cannot access file"),
    "another group": ("SELECT * FROM read_parquet('{other}')", "Cannot access file"),
    "climbing out": ("SELECT * FROM read_parquet('{out}/../other/*.parquet')", "Cannot access file"),
    "glob of home": ("SELECT * FROM glob('{home}/**')", "Cannot access file"),
    "spill folder": ("SELECT * FROM read_csv('.tmp/leak.csv')", "Cannot access file"),
    "network": ("SELECT * FROM read_csv('https://example.com/x.csv')", "Cannot access file"),
    "nested query": ("SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')", "Cannot access file"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_stream_query_refuses_writes_and_reads_outside_the_parts(case: str, stream_home: dict[str, Path]):
    """Each hostile query is refused in one line (exit 3) and every file under the test's
    folder (home, parts, the current folder) is unchanged; a read of the parts still works."""
    from mlops_cli.main import app

    sql, why = HOSTILE[case]
    sql = sql.format(**{k: str(v) for k, v in stream_home.items()})
    ok = CliRunner().invoke(app, ["stream", "query", 'SELECT sum("offset") AS total FROM stream_scores'])
    assert ok.exit_code == 0 and "total" in ok.output and " 3 " in ok.output, ok.output
    before = snapshot(stream_home["root"])  # after the CLI's own first-run set-up
    result = CliRunner().invoke(app, ["stream", "query", sql])
    assert result.exit_code == DataError.exit_code, result.output
    line = one_error_line(result.output)
    assert why in line and "hunter2" not in result.output and "4111" not in result.output
    assert snapshot(stream_home["root"]) == before


# --------------------------------------------------------------------------- feature history


def _history_cases(folder: Path, history: pd.DataFrame) -> dict[str, tuple[Path | str, str]]:
    """Malformed histories and what the one-line error must say."""
    folder.mkdir()
    cases: dict[str, tuple[Path | str, str]] = {}

    def parquet(name: str, frame: pd.DataFrame, why: str) -> None:
        frame.to_parquet(folder / name, index=False)
        cases[name] = (folder / name, why)

    parquet("no-amount.parquet", history.drop(columns=["amount"]), "no column 'amount'")
    parquet("no-time.parquet", history.drop(columns=["event_time"]), "no column 'event_time'")
    parquet("amount-text.parquet", history.assign(amount="12.5"), "column 'amount' is large_string")
    parquet("time-garbage.parquet", history.assign(event_time="yesterday"), "do not convert")
    parquet(
        "time-int.parquet",
        history.assign(event_time=history["event_time"].astype("int64") // 10**9),
        "column 'event_time' is int64",
    )
    parquet("user-int.parquet", history.assign(user_id=range(len(history))), "column 'user_id' is int64")
    parquet("amount-list.parquet", history.assign(amount=[[1.0]] * len(history)), "column 'amount' is list")
    (folder / "text.parquet").write_text("user_id,event_time,amount\n")
    cases["text.parquet"] = (folder / "text.parquet", "cannot be read as Parquet")
    whole = (folder / "no-amount.parquet").read_bytes()
    (folder / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    cases["truncated.parquet"] = (folder / "truncated.parquet", "cannot be read as Parquet")
    (folder / "notes.txt").write_text("hello\n")
    cases["notes.txt"] = (folder / "notes.txt", "unsupported format")
    (folder / "dangling.parquet").symlink_to(folder / "gone.parquet")
    cases["dangling.parquet"] = (folder / "dangling.parquet", "no such file")
    (folder / "empty").mkdir()
    cases["empty folder"] = (folder / "empty", "holds no .parquet or .csv")
    cases["glob of nothing"] = (str(folder / "nothing-*.parquet"), "matches no .parquet or .csv")
    (folder / "bad.csv").write_text("user_id,event_time,amount\nu1,not a time,3\n")
    cases["bad.csv"] = (folder / "bad.csv", "column 'event_time' is string")
    return cases


def test_malformed_feature_history_is_one_data_error_and_writes_nothing(tmp_path: Path):
    """Each malformed history stops the window-feature step of batch scoring with a one-line
    DataError naming the file or the column, and its work folder gets no input file."""
    from mlops.features import feature_views
    from tasks.scoring import add_window_features

    settings = load_settings(FEATURES_YAML, environ={"MLOPS_HOME": str(tmp_path / "home")})
    events = generate(400, seed=3).sort_values("event_time", kind="stable").reset_index(drop=True)
    rows = tmp_path / "rows.parquet"
    events.iloc[200:].to_parquet(rows, index=False)
    cases = _history_cases(tmp_path / "history", events.iloc[:200])
    work = tmp_path / "work"
    views = feature_views(settings)
    for name, (path, why) in cases.items():
        with pytest.raises(DataError) as err:
            add_window_features.fn(str(rows), str(work), views, settings.dataset, str(path), 1000)
        message = str(err.value)
        assert why in message and "\n" not in message, (name, message)
        assert not (work / "_windows").exists() or not list((work / "_windows").iterdir()), name

    good = tmp_path / "good.parquet"
    events.iloc[:200].to_parquet(good, index=False)
    out = add_window_features.fn(str(rows), str(work), views, settings.dataset, str(good), 1000)
    assert [p.name for p in (work / "_windows").iterdir()] == ["input.parquet"] and out.endswith(
        "input.parquet"
    )


@pytest.mark.slow
def test_score_with_a_malformed_feature_history_exits_non_zero_with_one_line_and_no_output(
    flow_home: Settings, window_model: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """`mlops score --feature-history` with a file that is not Parquet, or lacks a column, or
    has a time column of numbers: exit 3, one error line naming the problem, no scored row
    (no file under the score store, staged or published) and no work folder left behind."""
    from adapters import storage
    from mlops.features import FeatureSet
    from mlops_cli.main import app
    from tests.conftest import register_window_model

    monkeypatch.setenv("MLOPS_CONFIG", str(FEATURES_YAML))
    settings = load_settings()
    fs = FeatureSet.from_settings(settings)
    register_window_model(settings, window_model, "champion", fs)
    day = generate(2_000, seed=31, start=datetime(DAY.year, DAY.month, DAY.day))
    day = day.sort_values("event_time", kind="stable").reset_index(drop=True)
    (settings.data_dir / "score").mkdir(parents=True, exist_ok=True)
    day.iloc[1_000:].to_parquet(settings.data_dir / "score" / f"{DAY}.parquet", index=False)
    cases = _history_cases(tmp_path / "history", day.iloc[:1_000])
    for name in ("text.parquet", "no-amount.parquet", "time-int.parquet"):
        path, why = cases[name]
        result = CliRunner().invoke(app, ["score", "--date", DAY.isoformat(), "--feature-history", str(path)])
        assert result.exit_code == DataError.exit_code, (name, result.output)
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and why in errors[0] and "Traceback" not in result.output, result.output
        home = settings.home_path
        written = (
            [p for p in (home / "scores").rglob("*") if p.is_file()] if (home / "scores").exists() else []
        )
        assert not written, (name, written)  # no part, staged or published
        if (home / "warehouse.duckdb").exists():  # a run refused before opening the store creates none
            assert storage.query(home, "SELECT count(*) AS n FROM scores").column("n").to_pylist() == [0]
        assert not list((home / "tmp").glob("score-input-*")), name  # the work folder is gone
    assert os.listdir(tmp_path / "history")  # the inputs themselves are untouched
