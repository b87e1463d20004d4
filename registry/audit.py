"""Alias audit history and the per-model lease that makes alias moves compare-and-set.

MLflow's alias update is last-writer-wins, so two promotions racing on the same model
could both "succeed". Every alias move therefore happens under a lease row in a SQL
database (SQLite in MLOPS_HOME by default; any SQLAlchemy URL, e.g. the PostgreSQL
database a team's tracking server uses). Taking the lease is one ``INSERT`` on a primary
key, which is atomic across processes and machines; a holder that died leaves a row whose
expiry lets the next promoter take over.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from mlops.errors import RegistryBusy, RegistryError
from mlops.registry_model import AliasMove

metadata = MetaData()
alias_audit = Table(
    "alias_audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", String(40), nullable=False),
    Column("model", String(256), nullable=False, index=True),
    Column("alias", String(256), nullable=False),
    Column("from_version", Integer, nullable=True),
    Column("to_version", Integer, nullable=True),
    Column("actor", String(256), nullable=False),
    Column("action", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("run_id", String(64), nullable=True),
)
registry_lease = Table(
    "registry_lease",
    metadata,
    Column("model", String(256), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires", Float, nullable=False),
)


def default_actor() -> str:
    """Who is acting: ``$MLOPS_ACTOR``, else ``user@host``."""
    actor = os.environ.get("MLOPS_ACTOR")
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now_iso() -> str:
    """Now, in UTC, as ISO 8601 with milliseconds (the ledger's timestamps)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AuditLedger:
    """The audit table and lease table in one SQL database."""

    def __init__(self, url: str):
        self.url = url
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise RegistryError(f"audit database {url} is not usable: {exc.__class__.__name__}") from exc

    # ----------------------------------------------------------------- lease

    @contextmanager
    def lease(self, model: str, ttl: float, wait: float) -> Iterator[Lease]:
        """Hold the model's lease for the block; wait up to ``wait`` seconds for it."""
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            now = time.time()
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        delete(registry_lease).where(
                            registry_lease.c.model == model, registry_lease.c.expires < now
                        )
                    )
                    conn.execute(insert(registry_lease).values(model=model, holder=holder, expires=now + ttl))
                break
            except (IntegrityError, OperationalError):
                if time.monotonic() >= deadline:
                    raise RegistryBusy(
                        f"another promotion of '{model}' holds the registry lease; retry later"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        lease = Lease(self, model, holder, ttl)
        try:
            yield lease
        finally:
            with self.engine.begin() as conn:
                conn.execute(
                    delete(registry_lease).where(
                        registry_lease.c.model == model, registry_lease.c.holder == holder
                    )
                )

    # ----------------------------------------------------------------- history

    def append(self, moves: list[AliasMove]) -> None:
        """Record moves atomically (all or none)."""
        at = now_iso()
        with self.engine.begin() as conn:
            for m in moves:
                conn.execute(
                    insert(alias_audit).values(
                        at=m.at or at,
                        model=m.model,
                        alias=m.alias,
                        from_version=m.from_version,
                        to_version=m.to_version,
                        actor=m.actor,
                        action=m.action,
                        reason=m.reason,
                        run_id=m.run_id,
                    )
                )

    def history(self, model: str | None = None, limit: int | None = None) -> list[AliasMove]:
        """Moves oldest first (the newest ``limit`` when given)."""
        query = select(alias_audit).order_by(alias_audit.c.seq.desc())
        if model is not None:
            query = query.where(alias_audit.c.model == model)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [AliasMove(**{k: r[k] for k in r.keys()}) for r in reversed(rows)]

    def last_known(self, model: str) -> dict[str, int | None]:
        """Where the history last left each alias of ``model``."""
        state: dict[str, int | None] = {}
        for move in self.history(model):
            state[move.alias] = move.to_version
        return state


class Lease:
    """A held model lease; ``confirm`` fails if it expired and someone else took it."""

    def __init__(self, ledger: AuditLedger, model: str, holder: str, ttl: float):
        self.ledger, self.model, self.holder, self.ttl = ledger, model, holder, ttl

    def confirm(self) -> None:
        """Extend the lease, or raise if it is no longer ours (never act on a lost lease)."""
        with self.ledger.engine.begin() as conn:
            result = conn.execute(
                update(registry_lease)
                .where(registry_lease.c.model == self.model, registry_lease.c.holder == self.holder)
                .values(expires=time.time() + self.ttl)
            )
        if result.rowcount != 1:
            raise RegistryBusy(
                f"the registry lease on '{self.model}' expired mid-operation; nothing more was moved"
            )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
