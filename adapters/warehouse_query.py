"""Read-only SQL over the score store's warehouse: one read statement, in a confined DuckDB.

``mlops query`` hands SQL typed by a user to DuckDB, which can read any file the process
can (``read_csv('/etc/passwd')``), write files (``COPY ... TO``), attach other databases,
install and load extensions and change its own settings. Two independent defences keep a
query to reading the store:

1. ``check_read_only``: DuckDB's own parser splits the text into statements; exactly one
   statement of type SELECT is accepted (``SELECT``, ``WITH``, ``FROM t``, ``VALUES``,
   ``DESCRIBE``, ``SUMMARIZE``, ``SHOW``). Anything else -- several statements, ``COPY``,
   ``ATTACH``/``DETACH``, ``INSTALL``/``LOAD``, ``SET``/``RESET``, ``PRAGMA``, ``CALL``,
   ``EXPORT``, ``EXPLAIN``, DDL and DML -- is refused with ``QueryRefused`` before it runs.
2. ``confine``: after the warehouse is attached (read-only), the connection's file system
   is limited to the store's ``scores`` folder (the Parquet files the ``scores`` view
   reads), external access, extension auto-install and auto-load are switched off, spilling
   to disk is switched off (DuckDB would otherwise also allow reads under its temporary
   directory, ``.tmp`` in the current directory by default), and the configuration is
   locked, so a statement that got past the parser still cannot read or write a file outside
   the store, reach the network, load code or undo the settings.

A query also runs within ``QueryConfig`` (``query`` in the config): DuckDB's memory limit,
a wall-clock limit after which the connection is interrupted, and a cap on result rows, so
one query cannot hold the machine or the warehouse's read lock for good.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from mlops.errors import DataError
from mlops.settings import QueryConfig

__all__ = ["QueryRefused", "check_read_only", "confine", "query_stream", "run"]


class QueryRefused(DataError):
    """A query is not exactly one read statement (it would write, attach, configure or run several)."""


def _one_line(sql: str, width: int = 60) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def check_read_only(sql: str) -> str:
    """``sql`` if DuckDB parses it as exactly one SELECT statement; else ``QueryRefused`` saying why."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        raise QueryRefused(f"query does not parse: {first}") from None
    if not statements:
        raise QueryRefused("empty query: give one SELECT statement")
    if len(statements) > 1:
        kinds = ", ".join(s.type.name for s in statements)
        raise QueryRefused(
            f"query has {len(statements)} statements ({kinds}); only one read statement is accepted"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(
            f"{kind.name} statement refused ({_one_line(sql)}): the warehouse is queried read-only, "
            "only a single SELECT (or WITH / FROM / DESCRIBE / SUMMARIZE) is accepted"
        )
    return sql


def _directories(folders: Iterable[Path]) -> list[str]:
    """Each folder as given (made absolute) and with symlinks resolved, with a trailing slash."""
    out: list[str] = []
    for folder in folders:
        for form in (Path(os.path.abspath(folder)), folder.resolve()):
            text = str(form).rstrip("/") + "/"
            if text not in out:
                out.append(text)
    return out


def confine(
    con: duckdb.DuckDBPyConnection, readable: Iterable[Path], limits: QueryConfig | None = None
) -> None:
    """Limit ``con`` for good to the files under ``readable``: no other file, network, extension,
    spill file or setting, and at most ``limits.memory_limit_mb`` of memory."""
    limits = limits or QueryConfig()
    allowed = ", ".join("'" + d.replace("'", "''") + "'" for d in _directories(readable))
    for statement in (
        "SET temp_directory = ''",  # else its folder is readable too
        f"SET memory_limit = '{int(limits.memory_limit_mb)}MB'",
        f"SET allowed_directories = [{allowed}]",
        "SET enable_external_access = false",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET lock_configuration = true",
    ):
        con.execute(statement)


def run(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: Sequence[object] | None = None,
    readable: str = "the score store",
    limits: QueryConfig | None = None,
) -> pa.Table:
    """The whole result of ``sql`` on a confined ``con`` as Arrow, within ``limits``; a refusal,
    a limit reached or a failure is one line (a refused file access says that only ``readable``
    can be read).

    A relation's ``to_arrow_table()`` materializes the result before the connection closes
    (in DuckDB 2.0, ``execute()`` results stream and would not).
    """
    limits = limits or QueryConfig()
    timer = threading.Timer(limits.timeout_seconds, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        result = con.sql(sql, params=params).limit(limits.max_rows + 1).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise QueryRefused(f"query refused: {_first_line(exc)} (only {readable} can be read)") from None
    except duckdb.InterruptException:
        raise QueryRefused(
            f"query stopped after {limits.timeout_seconds:g} s (query.timeout_seconds): narrow it"
        ) from None
    except duckdb.OutOfMemoryException:
        raise QueryRefused(
            f"query stopped: it needs more than {limits.memory_limit_mb} MB (query.memory_limit_mb)"
        ) from None
    except duckdb.Error as exc:
        raise DataError(f"query failed: {_first_line(exc)}") from None
    finally:
        timer.cancel()
    if result.num_rows > limits.max_rows:
        raise QueryRefused(
            f"query returns more than {limits.max_rows:,} rows (query.max_rows): aggregate it or add a LIMIT"
        )
    return result


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def query_stream(folder: Path, sql: str, limits: QueryConfig | None = None) -> pa.Table:
    """One read statement over a stream consumer's committed parts, as the view ``stream_scores``
    (an in-memory DuckDB confined to ``folder`` and ``limits``, like the warehouse's queries).
    Columns are matched by name across parts: one that some parts lack (a run without routes)
    is null in their rows."""
    check_read_only(sql)
    if not any(Path(folder).glob("part-*.parquet")):
        raise DataError(f"{folder}: no stream output yet (run `mlops stream run` first)")
    glob = str(Path(folder).resolve() / "part-*.parquet").replace("'", "''")
    con = duckdb.connect(":memory:")
    try:
        con.execute(
            f"CREATE VIEW stream_scores AS SELECT * FROM read_parquet('{glob}', union_by_name = true)"
        )
        confine(con, [Path(folder)], limits)
        return run(con, sql, readable="the group's committed stream parts", limits=limits)
    finally:
        con.close()
