"""Async inference: ``POST /predict/async`` enqueues a job, a worker scores it like ``/predict``.

Why not BentoML's ``@bentoml.task``: in BentoML 1.4 a task's result row is in SQLite, but
the task itself runs as a Starlette background task of the request that submitted it. A
task running (or not yet started) when the process dies stays ``in_progress`` for ever:
nothing re-runs it after a restart. Every submit starts at once (no bound, no 429), the
results are kept a fixed 24 h, the store lives under BENTOML_HOME rather than MLOPS_HOME,
there is no callback, and tasks exist only for typed ``@bentoml.api`` methods, not for the
Starlette routes this service is built from. See docs/design/async-inference.md.

So the queue is the service's own: ``JobStore`` keeps one row per job in
``$MLOPS_HOME/run/async-jobs.db`` (SQLite in WAL mode, every change one committed
transaction, fsynced when ``serving.async_jobs.fsync``). A 202 is answered only after the
job's row is committed, so an accepted job survives a SIGKILL. A job is ``queued``, then
``running`` (claimed by a worker, ``attempts`` counted), then ``done`` (with the answer
``/predict`` gives) or ``failed`` (with a reason and HTTP status); ``expired`` once its
TTL passed (payload and result deleted; the row itself goes one TTL later, then 404).

At-least-once. A job that was ``running`` when the process died is queued again at the
next start and scored again (its ``attempts`` say so). Its records' request ids were
fixed at submit time (``job-<key>`` or ``job-<key>:<i>`` unless the caller gave them), so
a row logged by the interrupted attempt and one by the retry carry the same request id:
the prediction log dedupes on it. After ``max_attempts`` interruptions the job fails.

Job ids are 128 random bits (``secrets.token_urlsafe(16)``) and there is no way to list
jobs: a caller reads a job only with its id. The database is keyed by ``sha256(id)[:32]``
and the prediction log's request ids derive from that key, so the log does not reveal ids
(the database keeps the id itself only for a job with a callback, whose body names it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mlops.request_validation import InvalidRequest, Record, parse_json
from mlops.routing import CANDIDATE, FORCE_HEADER, STABLE, InvalidRouteTable
from mlops.settings import AsyncJobsConfig, Settings
from serving.errors import Overloaded, ServingError

if TYPE_CHECKING:
    from serving.runtime import ServingRuntime

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, EXPIRED = "queued", "running", "done", "failed", "expired"
PENDING = (QUEUED, RUNNING)
CALLBACK_FIELD = "callback_url"
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")
MAX_URL = 2000
RETRY_S = 0.5
"""How long a job waits before it is tried again when the service is at capacity or the
slot it needs holds no model (503): it stays queued until then (or until its TTL)."""


class QueueFull(ServingError):
    """``serving.async_jobs.max_pending`` jobs wait or run (or ``max_stored`` are kept): 429."""

    status = 429


class UnknownJob(ServingError):
    """No job has this id (never had, or deleted a TTL after it expired): 404."""

    status = 404


def jobs_path(settings: Settings) -> Path:
    """Where the async job queue of this MLOPS_HOME lives."""
    return settings.run_dir / "async-jobs.db"


def job_key(job_id: str) -> str:
    """The stored key of a job id: what the database and the prediction log hold instead of the id."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:32]


def check_callback(url: object, allowed_hosts: tuple[str, ...]) -> str:
    """``url`` when it is an http(s) URL to an allow-listed host, else ``InvalidRequest`` (400).

    Hosts compare exactly (case-insensitive; IP literals in canonical form), so
    ``127.0.0.1.example.com``, ``user@host`` tricks, other schemes and non-canonical IP
    spellings are refused: a caller cannot make the service call arbitrary addresses.
    """
    if type(url) is not str:
        raise InvalidRequest(f"{CALLBACK_FIELD} must be a string URL", 400)
    if not 0 < len(url) <= MAX_URL or any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidRequest(
            f"{CALLBACK_FIELD} must be a URL of at most {MAX_URL} characters, no spaces", 400
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"{CALLBACK_FIELD} is not a valid URL: {exc}", 400) from None
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest(f"{CALLBACK_FIELD} must be http or https, got {parts.scheme[:20]!r}", 400)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidRequest(f"{CALLBACK_FIELD} must not carry credentials", 400)
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidRequest(f"{CALLBACK_FIELD} has no host", 400)
    try:
        canonical = str(ipaddress.ip_address(host))
    except ValueError:
        canonical = host
    allowed = {h.lower() for h in allowed_hosts}
    if canonical != host or host not in allowed:
        raise InvalidRequest(
            f"{CALLBACK_FIELD} host {host[:100]!r} is not allowed "
            f"(serving.async_jobs.callback_hosts: {', '.join(sorted(allowed)) or 'none'})",
            400,
        )
    del port  # parsed only to refuse an out-of-range port
    return url


@dataclass(frozen=True, slots=True)
class Job:
    """One row of the job queue."""

    key: str
    state: str
    payload: dict[str, Any] | None
    forced: str | None
    callback_url: str | None
    created_at: float
    updated_at: float
    expires_at: float
    attempts: int
    result: dict[str, Any] | None
    error: str | None
    status: int | None
    callback_state: str | None
    callback_job_id: str | None


_COLUMNS = (
    "key, state, payload, forced, callback_url, created_at, updated_at, expires_at, attempts, "
    "result, error, status, callback_state, callback_job_id"
)


def _job(row: tuple) -> Job:
    return Job(
        row[0],
        row[1],
        None if row[2] is None else json.loads(row[2]),
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        None if row[9] is None else json.loads(row[9]),
        row[10],
        row[11],
        row[12],
        row[13],
    )


class JobStore:
    """The durable job queue: SQLite in WAL mode, one row per job, one transaction per change.

    Thread-safe (one connection behind a lock); the service calls it off the event loop.
    """

    def __init__(self, path: Path, *, fsync: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                key TEXT NOT NULL UNIQUE,
                state TEXT NOT NULL,
                payload TEXT,
                forced TEXT,
                callback_url TEXT,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                expires_at REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                result TEXT,
                error TEXT,
                status INTEGER,
                callback_state TEXT,
                callback_job_id TEXT,
                callback_attempts INTEGER NOT NULL DEFAULT 0,
                callback_next_at REAL,
                ready_at REAL NOT NULL DEFAULT 0
            );
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
            CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
            CREATE INDEX IF NOT EXISTS jobs_callback ON jobs (callback_state, callback_next_at);
            """
        )

    def close(self) -> None:
        """Close the database (committed jobs stay on disk)."""
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def recover(self, now: float) -> int:
        """Queue again every job that was running when the last process stopped; how many."""
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?", (QUEUED, now, RUNNING)
            ).rowcount

    def submit(
        self,
        key: str,
        payload: dict[str, Any],
        forced: str | None,
        callback_url: str | None,
        now: float,
        cfg: AsyncJobsConfig,
        job_id: str | None = None,
    ) -> None:
        """Commit a new queued job, or raise ``QueueFull`` when a bound is reached.

        ``job_id`` is kept only for a job with a callback (whose body names the job).
        """
        body = json.dumps(payload, separators=(",", ":"))
        with self._tx() as db:
            pending = db.execute("SELECT count(*) FROM jobs WHERE state IN (?, ?)", PENDING).fetchone()[0]
            if pending >= cfg.max_pending:
                raise QueueFull(
                    f"the async queue is full: {pending} jobs wait or run "
                    f"(serving.async_jobs.max_pending {cfg.max_pending}); retry later"
                )
            stored = db.execute("SELECT count(*) FROM jobs WHERE state != ?", (EXPIRED,)).fetchone()[0]
            if stored >= cfg.max_stored:
                raise QueueFull(
                    f"the async store is full: {stored} jobs kept "
                    f"(serving.async_jobs.max_stored {cfg.max_stored}); retry later"
                )
            db.execute(
                "INSERT INTO jobs (key, state, payload, forced, callback_url, created_at, updated_at,"
                " expires_at, callback_state, callback_job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    QUEUED,
                    body,
                    forced,
                    callback_url,
                    now,
                    now,
                    now + cfg.ttl_seconds,
                    None if callback_url is None else "waiting",
                    None if callback_url is None else job_id,
                ),
            )

    def claim(self, now: float, max_attempts: int, ttl: float) -> Job | None:
        """The oldest queued, unexpired job, now ``running`` with one more attempt; None if none.

        A job already interrupted ``max_attempts`` times is failed instead (and the next taken).
        """
        while True:
            with self._tx() as db:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE state = ? AND expires_at > ? AND ready_at <= ?"
                    " ORDER BY seq LIMIT 1",
                    (QUEUED, now, now),
                ).fetchone()
                if row is None:
                    return None
                job = _job(row)
                if job.attempts >= max_attempts:
                    self._finish(
                        db,
                        job.key,
                        FAILED,
                        None,
                        f"interrupted {job.attempts} times while running (serving.async_jobs.max_attempts)",
                        500,
                        now,
                        now + ttl,
                    )
                    continue
                db.execute(
                    "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE key = ?",
                    (RUNNING, now, job.key),
                )
                return Job(
                    **{**_asdict(job), "state": RUNNING, "attempts": job.attempts + 1, "updated_at": now}
                )

    def release(self, key: str, now: float, retry_at: float) -> None:
        """Put a running job back in the queue without counting the attempt (capacity, no model);
        it is not claimed again before ``retry_at``, so it does not hold up the jobs behind it."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, attempts = max(attempts - 1, 0), updated_at = ?, ready_at = ?"
                " WHERE key = ? AND state = ?",
                (QUEUED, now, retry_at, key, RUNNING),
            )

    @staticmethod
    def _finish(
        db: sqlite3.Connection,
        key: str,
        state: str,
        result: dict[str, Any] | None,
        error: str | None,
        status: int | None,
        now: float,
        expires_at: float,
    ) -> None:
        db.execute(
            "UPDATE jobs SET state = ?, result = ?, error = ?, status = ?, updated_at = ?, expires_at = ?,"
            " payload = NULL, callback_next_at = CASE WHEN callback_state IS NULL THEN NULL ELSE ? END,"
            " callback_state = CASE WHEN callback_state IS NULL THEN NULL ELSE 'pending' END"
            " WHERE key = ?",
            (
                state,
                None if result is None else json.dumps(result, separators=(",", ":")),
                error,
                status,
                now,
                expires_at,
                now,
                key,
            ),
        )

    def finish(
        self,
        key: str,
        state: str,
        now: float,
        ttl: float,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        status: int | None = None,
    ) -> None:
        """Record a job's outcome (``done`` with its result, ``failed`` with a reason); kept ``ttl`` s."""
        with self._tx() as db:
            self._finish(db, key, state, result, error, status, now, now + ttl)

    def get(self, key: str) -> Job | None:
        """The job stored under ``key``, if any."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else _job(row)

    def sweep(self, now: float, ttl: float) -> tuple[int, int]:
        """Expire jobs past their TTL (payload and result deleted) and delete rows expired a TTL
        ago; (expired, deleted). A running job is left to finish (it gets a fresh TTL)."""
        with self._tx() as db:
            expired = db.execute(
                "UPDATE jobs SET state = ?, payload = NULL, result = NULL, callback_state = NULL,"
                " updated_at = ? WHERE state IN (?, ?, ?) AND expires_at <= ?",
                (EXPIRED, now, QUEUED, DONE, FAILED, now),
            ).rowcount
            deleted = db.execute(
                "DELETE FROM jobs WHERE state = ? AND expires_at <= ?", (EXPIRED, now - ttl)
            ).rowcount
        return expired, deleted

    def callbacks_due(self, now: float, limit: int = 32) -> list[Job]:
        """Finished jobs whose callback is due for (another) delivery attempt."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE callback_state = 'pending' AND callback_next_at <= ?"
                " ORDER BY callback_next_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def callback_result(self, key: str, delivered: bool, now: float, max_attempts: int) -> int:
        """Record one delivery attempt; retried with backoff until ``max_attempts``. Attempts so far."""
        with self._tx() as db:
            row = db.execute("SELECT callback_attempts FROM jobs WHERE key = ?", (key,)).fetchone()
            if row is None:
                return 0
            n = row[0] + 1
            state = "delivered" if delivered else "failed" if n >= max_attempts else "pending"
            db.execute(
                "UPDATE jobs SET callback_state = ?, callback_attempts = ?, callback_next_at = ?"
                " WHERE key = ? AND callback_state = 'pending'",
                (state, n, now + min(60.0, 2.0 ** (n - 1)), key),
            )
            return n

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}


def _asdict(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in Job.__slots__}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def view(job_id: str, job: Job, now: float) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of ``GET /predict/async/{job_id}`` for a stored job."""
    state = EXPIRED if job.state != RUNNING and job.expires_at <= now else job.state
    out: dict[str, Any] = {
        "job_id": job_id,
        "state": state,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "attempts": job.attempts,
    }
    if state == EXPIRED:
        out["error"] = "the job expired (serving.async_jobs.ttl_seconds) and its result was deleted"
        return 410, out
    out["expires_at"] = _iso(job.expires_at)
    if state == DONE:
        out["result"] = job.result
    elif state == FAILED:
        out["error"] = job.error
        out["status"] = job.status
    if job.callback_state is not None:
        out["callback"] = job.callback_state
    return 200, out


class AsyncJobs:
    """The async endpoints' side of the service: submit, look up, and the background workers
    (scoring through ``ServingRuntime.predict``, TTL sweeps, callback delivery)."""

    def __init__(self, runtime: ServingRuntime, store: JobStore | None = None):
        self.rt = runtime
        self.cfg = runtime.cfg.async_jobs
        self.store = store or JobStore(jobs_path(runtime.settings), fsync=self.cfg.fsync)
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._http: Any = None

    async def start(self) -> None:
        """Re-queue jobs interrupted by the last stop and start the workers."""
        requeued = await asyncio.to_thread(self.store.recover, time.time())
        if requeued:
            log.warning("async jobs: %d jobs were running at the last stop; queued again", requeued)
        import httpx

        self._http = httpx.AsyncClient(
            timeout=self.cfg.callback_timeout_seconds, follow_redirects=False, trust_env=False
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work(), name=f"async-job-{i}") for i in range(self.cfg.workers)]
        self._tasks.append(loop.create_task(self._sweep(), name="async-job-sweep"))
        self._tasks.append(loop.create_task(self._callbacks(), name="async-job-callbacks"))

    async def stop(self) -> None:
        """Let running jobs finish (within the scoring timeout), then stop; queued jobs stay queued."""
        self._stopping = True
        self._wake.set()
        workers = self._tasks[: self.cfg.workers]
        if workers:
            await asyncio.wait(workers, timeout=self.rt.timeout + 2.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.aclose()
        self.store.close()

    # ------------------------------------------------------------------ endpoints

    async def submit(self, body: bytes, forced: str | None) -> dict[str, Any]:
        """Validate a ``/predict`` body (plus an optional ``callback_url``) and queue it; the 202 body."""
        data = parse_json(body)
        callback = None
        if type(data) is dict and CALLBACK_FIELD in data:
            data = dict(data)
            callback = check_callback(data.pop(CALLBACK_FIELD), self.cfg.callback_hosts)
        records = self.rt.validator.predict(data)
        if forced is not None and forced not in (STABLE, CANDIDATE):
            raise InvalidRequest(f"{FORCE_HEADER} must be 'stable' or 'candidate', got {forced[:40]!r}", 400)
        job_id = secrets.token_urlsafe(16)
        key = job_key(job_id)
        single = len(records) == 1
        now = time.time_ns()  # a raw transaction's features are looked up as of its submission
        payload = {
            "records": [
                {
                    "features": r.features,
                    "request_id": r.request_id or (f"job-{key}" if single else f"job-{key}:{i}"),
                    "entity_key": r.entity_key,
                    **(
                        {"entity": r.entity, "ts_ns": now if r.ts_ns is None else r.ts_ns}
                        if r.entity is not None
                        else {}
                    ),
                }
                for i, r in enumerate(records)
            ]
        }
        await asyncio.to_thread(
            self.store.submit, key, payload, forced, callback, time.time(), self.cfg, job_id
        )
        self._wake.set()
        return {"job_id": job_id, "state": QUEUED, "status_url": f"/predict/async/{job_id}"}

    async def lookup(self, job_id: str) -> tuple[int, dict[str, Any]]:
        """Status and body of a job by its id; ``UnknownJob`` when there is none."""
        if not JOB_ID.match(job_id):
            raise UnknownJob("no such job")
        job = await asyncio.to_thread(self.store.get, job_key(job_id))
        if job is None:
            raise UnknownJob("no such job (never submitted, or deleted after it expired)")
        return view(job_id, job, time.time())

    # ------------------------------------------------------------------ workers

    async def _work(self) -> None:
        while not self._stopping:
            self._wake.clear()
            # With no model in either slot nothing can be scored: no job is claimed, so each
            # reads ``queued`` (attempts unchanged) until a version is loaded or its TTL ends.
            job = (
                await asyncio.to_thread(
                    self.store.claim, time.time(), self.cfg.max_attempts, self.cfg.ttl_seconds
                )
                if self.rt.state.versions()
                else None
            )
            if job is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_S):
                        await self._wake.wait()
                continue
            self._wake.set()  # another worker may take the next one
            try:
                await self._run(job)
            except Exception as exc:  # a bug in scoring a job must not stop the worker
                log.exception("async job %s failed unexpectedly", job.key)
                await asyncio.to_thread(
                    self.store.finish,
                    job.key,
                    FAILED,
                    time.time(),
                    self.cfg.ttl_seconds,
                    error=f"internal error: {type(exc).__name__}: {exc}",
                    status=500,
                )

    async def _run(self, job: Job) -> None:
        assert job.payload is not None
        records = [
            Record(r["features"], r["request_id"], r["entity_key"], r.get("entity"), r.get("ts_ns"))
            for r in job.payload["records"]
        ]
        rt = self.rt
        while True:
            try:
                rt.admit()  # async jobs share the service's in-flight capacity with /predict
                break
            except Overloaded:
                if self._stopping:
                    now = time.time()
                    await asyncio.to_thread(self.store.release, job.key, now, now)
                    return
                await asyncio.sleep(0.01)
        try:
            answer = await rt.predict(records, job.forced, time.perf_counter())
        except InvalidRequest as exc:
            await self._fail(job, str(exc), exc.status)
            return
        except InvalidRouteTable as exc:
            await self._fail(job, str(exc), 400)
            return
        except ServingError as exc:
            if exc.status == 503:  # no model in the slot yet, or shedding: try again later
                now = time.time()
                await asyncio.to_thread(self.store.release, job.key, now, now + RETRY_S)
                await asyncio.sleep(RETRY_S)  # and no busy loop through a queue nothing can score
                return
            await self._fail(job, str(exc), exc.status)
            return
        finally:
            rt.done()
        await asyncio.to_thread(
            self.store.finish, job.key, DONE, time.time(), self.cfg.ttl_seconds, result=answer
        )

    async def _fail(self, job: Job, reason: str, status: int) -> None:
        await asyncio.to_thread(
            self.store.finish, job.key, FAILED, time.time(), self.cfg.ttl_seconds, error=reason, status=status
        )

    async def _sweep(self) -> None:
        while True:
            expired, deleted = await asyncio.to_thread(self.store.sweep, time.time(), self.cfg.ttl_seconds)
            if expired or deleted:
                log.info("async jobs: %d expired, %d deleted", expired, deleted)
            await asyncio.sleep(self.cfg.sweep_seconds)

    async def _callbacks(self) -> None:
        while True:
            due = await asyncio.to_thread(self.store.callbacks_due, time.time())
            if not due:
                await asyncio.sleep(0.2)
                continue
            outcomes = await asyncio.gather(*(self._deliver(job) for job in due), return_exceptions=True)
            for job, outcome in zip(due, outcomes, strict=True):
                if isinstance(outcome, Exception):  # a bug; the delivery is retried with backoff
                    log.error("async job %s: callback delivery crashed: %r", job.key, outcome)
                    await asyncio.to_thread(
                        self.store.callback_result, job.key, False, time.time(), self.cfg.callback_attempts
                    )

    async def _deliver(self, job: Job) -> None:
        """POST the job's status body to its callback URL; a 2xx answer counts as delivered."""
        import httpx

        assert job.callback_url is not None
        delivered = False
        try:
            url = check_callback(job.callback_url, self.cfg.callback_hosts)  # the allow-list may have shrunk
            body = view(job.callback_job_id or "", job, time.time())[1]
            resp = await self._http.post(url, json=body)
            delivered = 200 <= resp.status_code < 300
            if not delivered:
                log.warning("async job %s: callback answered %d", job.key, resp.status_code)
        except (httpx.HTTPError, InvalidRequest) as exc:
            log.warning("async job %s: callback not delivered: %s", job.key, exc)
        await asyncio.to_thread(
            self.store.callback_result, job.key, delivered, time.time(), self.cfg.callback_attempts
        )
