"""Tenants of the online service: their credentials, their models and their quotas.

Credentials. ``mlops tenants add NAME`` creates a random token, prints it once and stores
only its SHA-256 in ``$MLOPS_HOME/run/tenants/NAME.sha256`` (mode 0600, created
exclusively). The service maps a presented token to its tenant by hash; the folder is
re-read at most once a second, so a tenant added or removed (its file deleted) while the
service runs is accepted or refused within a second.

Models. A tenant's model is the registered model ``<model>--<tenant>``
(``mlops.tenancy.tenant_model_name``), served at ``serving.tenants.alias``. Versions are
loaded on demand, by a caller holding that tenant's token only, into a ``ModelPool`` of
their own (keys ``(name, version)``, budget ``serving.tenants.model_memory_budget_mb``,
least recently used evicted). Versions whose ONNX files are byte for byte the same share one
session, so their rows are scored in one run (each is still charged in full to the budget). A request holds a reference on its model, so an eviction
never drops a request in flight: the evicted model closes after its last answer.

Prediction log. One thread writes every tenant's log: each tenant's rows are written every
``log_flush_seconds``, and the tenants take turns, spread evenly over that period (each second
the thread writes the files of the tenants whose turn it is, plus any tenant with
``log_flush_rows`` rows waiting), so a file's fixed cost (~4.5 ms of CPU) is paid per tenant
per period, never as one burst of a file per tenant. The rows written in one second are
converted to Arrow in one pass (``prepare_flush``), then each tenant's go to its own file, in
its own partition, ``$MLOPS_HOME/predictions-tenants/tenant=NAME/predictions/date=YYYY-MM-DD/
*.parquet``, away from the main model's log that the rollout gates read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import onnxruntime as ort

from adapters.files import create_new
from mlops.errors import ConfigError
from mlops.onnx_model import OnnxScorer, estimator_split, session_options
from mlops.predlog import RequestIds
from mlops.settings import Settings
from mlops.tenancy import TenantQuota, TokenBucket, check_tenant_name, owner_of
from serving.errors import ServingError, UnknownModel
from serving.first_labels import INDEX_FILE as FIRST_LABELS_FILE
from serving.first_labels import FirstLabels, tenant_scope
from serving.models import MEMORY_FACTOR, Head, LoadedModel, ModelPool, Prefix, SharedLane, pick_lane
from serving.predlog_store import PredictionLogStore
from serving.predlog_writer import PredictionLogWriter, prepare_flush
from serving.source import ModelSource

log = logging.getLogger(__name__)

TENANTS_DIR = "tenants"
HASH_SUFFIX = ".sha256"
TENANT_LOG_DIR = "predictions-tenants"
MODEL_OVERHEAD_BYTES = 1 << 20
"""Charged per loaded tenant model on top of its ONNX size: an ONNX Runtime session and its
buffers cost ~0.4-1.2 MiB resident however small the model (measured by
bench/tenants.py), so a budget of tiny models is not counted in kilobytes."""


class QuotaExceeded(ServingError):
    """A tenant is past its request rate or its requests in flight: 429 with ``Retry-After``."""

    status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def tenants_dir(settings: Settings) -> Path:
    """Where tenants' token hashes live."""
    return settings.run_dir / TENANTS_DIR


def tenant_log_dir(settings: Settings, tenant: str) -> Path:
    """The prediction-log partition of one tenant."""
    return settings.home_path / TENANT_LOG_DIR / f"tenant={tenant}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_tenant(settings: Settings, name: str) -> str:
    """Create tenant ``name`` and return its token (the only time it is shown); only the
    token's SHA-256 is written. ``ConfigError`` when the name is invalid or taken."""
    check_tenant_name(name)
    folder = tenants_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    token = secrets.token_urlsafe(32)
    path = folder / f"{name}{HASH_SUFFIX}"
    if not create_new(path, (_digest(token) + "\n").encode()):
        raise ConfigError(f"tenant '{name}' already exists ({path}); remove the file to reissue")
    return token


def list_tenants(settings: Settings) -> list[str]:
    """Names of the tenants created so far."""
    folder = tenants_dir(settings)
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(HASH_SUFFIX) for p in folder.glob(f"*{HASH_SUFFIX}"))


class TenantDirectory:
    """Maps a presented token to its tenant, from the hashes under ``run/tenants/``."""

    def __init__(self, folder: Path, refresh_seconds: float = 1.0):
        self.folder = folder
        self.refresh_seconds = refresh_seconds
        self._by_hash: dict[str, str] = {}
        self._read_at = -float("inf")
        self._stamp: tuple[int, int] | None = None

    def _reload(self) -> None:
        self._read_at = time.monotonic()
        try:
            st = os.stat(self.folder)
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return  # no hash file added or removed (they are only ever created or deleted)
        found: dict[str, str] = {}
        if stamp is not None:
            for path in self.folder.glob(f"*{HASH_SUFFIX}"):
                try:
                    digest = path.read_text().strip()
                except FileNotFoundError:  # removed while listed
                    continue
                if len(digest) == 64:
                    found[digest] = path.name.removesuffix(HASH_SUFFIX)
                else:  # being written by `mlops tenants add`: read the folder again next time
                    stamp = None
        self._by_hash = found
        self._stamp = stamp

    def tenant_of(self, authorization: str | None) -> tuple[str | None, int]:
        """(tenant, 0) for a valid ``Bearer <tenant token>``; else (None, 401) when no bearer
        credentials were sent and (None, 403) when they match no tenant."""
        if not authorization:
            return None, 401
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            return None, 401
        if time.monotonic() - self._read_at >= self.refresh_seconds:
            self._reload()  # picks up added tenants and drops removed ones within a second
            # (a stat of the folder; the files are re-read only when it changed)
        name = self._lookup(_digest(value))
        return (name, 0) if name is not None else (None, 403)

    def _lookup(self, digest: str) -> str | None:
        # A dict lookup by SHA-256: its timing can only tell about the hash of a guess,
        # which says nothing usable about any tenant's token.
        return self._by_hash.get(digest)


class TenantModels:
    """Tenants' quotas, their models' pool, resolved aliases and per-tenant prediction logs."""

    def __init__(
        self,
        settings: Settings,
        sources: Callable[[str], ModelSource],
        build: Callable[[str, int, bytes, SharedLane], LoadedModel],
        id_key: bytes,
        aliases: Callable[[str, str], dict[str, int]] | None = None,
        first_labels: FirstLabels | None = None,
    ):
        """``aliases(prefix, alias)``, when given, resolves ``alias`` of every model named
        ``prefix...`` at once (``RegistryAliases.resolve_all``): stale aliases are then
        refreshed by one registry search for all tenants instead of one read per model.
        ``first_labels`` is the service's first-label index (default: its own under run/)."""
        cfg = settings.serving.tenants
        self.settings = settings
        self.cfg = cfg
        self.base_name = settings.serving.model_name or settings.training.model_name
        self.directory = TenantDirectory(tenants_dir(settings))
        self._sources_of = sources
        self._sources: dict[str, ModelSource] = {}
        self._build = build
        self.lanes = [
            SharedLane(f"tenants-{i}", settings.serving.micro_batch_rows) for i in range(cfg.scoring_threads)
        ]  # every tenant model's LoadedModel.worker is lanes[0]; submit() picks among them
        self.pool = ModelPool(self._load, int(cfg.model_memory_budget_mb * 2**20))
        self._refreshing: set[str] = set()
        self._resolve_all = aliases
        self._refreshing_all = False
        self.held: dict[str, int] = {}  # refusals being held back (refusal_delay_ms), per tenant
        self._aliases: dict[str, tuple[int, float]] = {}
        self.quotas: dict[str, TenantQuota] = {}
        self.writers: dict[str, PredictionLogWriter] = {}
        self._turns: dict[str, int] = {}  # tenant -> its second within the log flush period
        self._id_key = id_key
        self._ids: dict[str, RequestIds] = {}
        self.first_labels = first_labels or FirstLabels(settings.run_dir / FIRST_LABELS_FILE)
        self._flusher: threading.Thread | None = None
        self._stopping = threading.Event()
        self.load_seconds: list[float] = []
        self._sessions: weakref.WeakValueDictionary[bytes, OnnxScorer] = weakref.WeakValueDictionary()
        self._prefixes: weakref.WeakValueDictionary[bytes, Prefix] = weakref.WeakValueDictionary()
        self._sessions_lock = threading.Lock()  # loads run on worker threads

    # ------------------------------------------------------------ admission

    def admit(self, tenant: str, now: float | None = None) -> None:
        """Count a request of ``tenant`` in flight, or raise ``QuotaExceeded``."""
        quota = self.quotas.get(tenant)
        if quota is None:
            quota = self.quotas[tenant] = TenantQuota(
                TokenBucket(self.cfg.rate_per_second, float(self.cfg.burst)), self.cfg.max_concurrent
            )
        wait = quota.admit(time.monotonic() if now is None else now)
        if wait:
            raise QuotaExceeded(
                f"tenant '{tenant}' is over its quota ({self.cfg.rate_per_second:g} requests/s, "
                f"{self.cfg.max_concurrent} in flight); retry after {wait} s",
                wait,
            )

    async def hold_refusal(self, tenant: str) -> bool:
        """Wait ``refusal_delay_ms`` before a refusal of ``tenant`` is answered, so a client
        that retries at once (an unpaced flood) is slowed to that pace and costs the event
        loop little; True once waited. False, at once, when ``refusal_hold_max`` of its
        refusals are already waiting (the caller then also closes the connection)."""
        held = self.held.get(tenant, 0)
        delay = self.cfg.refusal_delay_ms / 1e3
        if delay <= 0:
            return True
        if held >= self.cfg.refusal_hold_max:
            return False
        self.held[tenant] = held + 1
        try:
            await asyncio.sleep(delay)
        finally:
            left = self.held[tenant] - 1
            if left:
                self.held[tenant] = left
            else:
                del self.held[tenant]
        return True

    def done(self, tenant: str) -> None:
        """A request admitted for ``tenant`` has been answered."""
        self.quotas[tenant].done()

    # ------------------------------------------------------------ models

    def check_owner(self, tenant: str, name: str) -> None:
        """``UnknownModel`` (404) unless ``name`` is ``<model>--<tenant>``: another tenant's
        model is answered exactly like a model that does not exist."""
        base, _, _ = name.rpartition("--")
        if owner_of(name) != tenant or base != self.base_name:
            raise UnknownModel(f"unknown model '{name[:100]}'")

    def _source(self, name: str) -> ModelSource:
        source = self._sources.get(name)
        if source is None:
            source = self._sources[name] = self._sources_of(name)
        return source

    def submit(
        self, tenant: str, model: LoadedModel, columns: Mapping[str, list], rows: int, deadline: float
    ) -> asyncio.Future:
        """Queue a request of ``tenant`` for ``model`` on a shared scoring thread
        (``pick_lane``); the future gets the ``[rows, 2]`` probabilities."""
        return pick_lane(self.lanes, tenant).submit(
            columns, rows, deadline, model.scorer, tenant, model.windows, model.head
        )

    async def version(self, name: str) -> int:
        """The version ``name``'s alias points at. Resolved from the registry on first use;
        after ``alias_refresh_seconds`` the cached version keeps answering while one
        background search refreshes every tenant model's alias (without ``aliases``: one
        background read of this model's). A request never waits on the registry once resolved."""
        hit = self._aliases.get(name)
        now = time.monotonic()
        if hit is not None:
            if now - hit[1] >= self.cfg.alias_refresh_seconds:
                if self._resolve_all is not None:
                    if not self._refreshing_all:
                        self._refreshing_all = True
                        asyncio.get_running_loop().create_task(self._refresh_all(), name="alias-tenants")
                elif name not in self._refreshing:
                    self._refreshing.add(name)
                    asyncio.get_running_loop().create_task(self._refresh(name), name=f"alias-{name}")
            return hit[0]
        version = await asyncio.to_thread(self._source(name).resolve, self.cfg.alias)
        if version is None:
            raise UnknownModel(f"unknown model '{name[:100]}'")
        self._aliases[name] = (version, now)
        return version

    async def _refresh(self, name: str) -> None:
        try:
            version = await asyncio.to_thread(self._source(name).resolve, self.cfg.alias)
        except ServingError as exc:  # the registry is down: keep answering with the cached version
            log.warning("tenant model %s: alias %s not refreshed (%s)", name, self.cfg.alias, exc)
            self._aliases[name] = (self._aliases[name][0], time.monotonic())
        else:
            if version is None:
                self._aliases.pop(name, None)  # alias removed: the next request answers 404
            else:
                self._aliases[name] = (version, time.monotonic())
        finally:
            self._refreshing.discard(name)

    async def _refresh_all(self) -> None:
        """Refresh every resolved alias with one search (a removed alias: dropped, so the next
        request resolves it alone and answers 404)."""
        assert self._resolve_all is not None
        try:
            found = await asyncio.to_thread(self._resolve_all, f"{self.base_name}--", self.cfg.alias)
        except ServingError as exc:  # the registry is down: keep answering with the cached versions
            log.warning("tenant models: alias %s not refreshed (%s)", self.cfg.alias, exc)
            now = time.monotonic()
            for name, (version, _) in list(self._aliases.items()):
                self._aliases[name] = (version, now)
        else:
            now = time.monotonic()
            for name in list(self._aliases):
                version = found.get(name)
                if version is None:
                    self._aliases.pop(name, None)
                else:
                    self._aliases[name] = (version, now)
        finally:
            self._refreshing_all = False

    def _load(self, key: tuple[str, int]) -> LoadedModel:
        """Build ``key``'s model (blocking, off the loop). When a loaded model has the same
        ONNX bytes (SHA-256), the new one is checked and warmed up like any other, then
        scores on that model's session: rows of tenants sharing one model file are scored
        in one run, and the pool keeps one session for them."""
        name, version = key
        started = time.perf_counter()
        source = self._source(name)
        onnx = source.onnx(version)
        model = self._build(name, version, onnx, self.lanes[0], source.tags(version))
        digest = hashlib.sha256(onnx).digest()
        with self._sessions_lock:
            shared = self._sessions.get(digest)
            if shared is not None and shared.schema is model.scorer.schema:
                model.scorer = shared
            else:
                self._sessions[digest] = model.scorer
        if not model.windows:
            self._split(model, onnx)
        model.nbytes += MODEL_OVERHEAD_BYTES
        self.load_seconds.append(time.perf_counter() - started)
        return model

    def _split(self, model: LoadedModel, onnx: bytes) -> None:
        """Give ``model`` its ``Head`` when its graph cuts before the estimator
        (``estimator_split``), its prefix shared with every loaded model whose prefix has the
        same bytes: a lane batch over models of one family preprocesses all their rows in one
        run, then runs each model's estimator on its rows. The head session is charged to
        the pool's budget on top of the model."""
        split = estimator_split(onnx)
        if split is None:
            return
        prefix_onnx, head_onnx, cut = split
        options = session_options(self.settings.serving.ort_threads)
        key = hashlib.sha256(prefix_onnx).digest()
        with self._sessions_lock:
            prefix = self._prefixes.get(key)
        if prefix is None:
            built = Prefix(
                ort.InferenceSession(prefix_onnx, options, providers=["CPUExecutionProvider"]), cut
            )
            with self._sessions_lock:
                prefix = self._prefixes.setdefault(key, built)
        head = ort.InferenceSession(head_onnx, options, providers=["CPUExecutionProvider"])
        model.head = Head(prefix, head)
        model.nbytes += int(len(head_onnx) * MEMORY_FACTOR)

    async def model(self, name: str) -> LoadedModel:
        """``name`` at the tenants' alias, loaded if need be (the caller's ownership checked)."""
        version = await self.version(name)
        return await self.pool.load((name, version), required=False)  # type: ignore[arg-type]

    # ------------------------------------------------------------ prediction log

    def writer(self, tenant: str) -> PredictionLogWriter:
        """The tenant's prediction-log writer, started on its first answer."""
        writer = self.writers.get(tenant)
        if writer is None:
            self._turns[tenant] = len(self._turns) % self.flush_period  # before the flush thread sees it
            folder = tenant_log_dir(self.settings, tenant)
            serving = self.settings.serving
            writer = self.writers[tenant] = PredictionLogWriter(
                folder / "predictions",
                folder / "feedback",
                self.settings.dataset,
                flush_seconds=serving.log_flush_seconds,
                flush_rows=serving.log_flush_rows,
                max_buffer_rows=serving.log_max_buffer_rows,
                on_feedback=partial(self.first_labels.written, tenant_scope(tenant)),
            )
            writer.start(thread=False)  # flushed by _flush_loop, one thread for every tenant
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="predlog-tenants", daemon=True)
                self._flusher.start()
        return writer

    def catch_up_labels(self) -> int:
        """Index the labels in every tenant's feedback log past the index's watermark
        (blocking: called once at start); rows read."""
        root = self.settings.home_path / TENANT_LOG_DIR
        n = 0
        for folder in sorted(root.glob("tenant=*")) if root.is_dir() else []:
            if not (folder / "feedback").is_dir():
                continue
            store = PredictionLogStore(folder / "predictions", folder / "feedback", self.settings.dataset)
            scope = tenant_scope(folder.name.removeprefix("tenant="))
            n += self.first_labels.catch_up(scope, lambda since, store=store: store.read_feedback(since))
        return n

    def ids(self, tenant: str) -> RequestIds:
        """Request ids for ``tenant``'s answers, keyed per tenant (the service's id key and the
        tenant's name), so only ids its own requests were given verify for it."""
        ids = self._ids.get(tenant)
        if ids is None:
            key = hashlib.blake2b(
                b"tenant:" + tenant.encode(), key=hashlib.blake2b(self._id_key).digest()
            ).digest()
            ids = self._ids[tenant] = RequestIds(key)
        return ids

    FLUSH_TICK_SECONDS = 1.0

    @property
    def flush_period(self) -> int:
        """Ticks (of ``FLUSH_TICK_SECONDS``, or one tick when ``log_flush_seconds`` is shorter)
        between two writes of one tenant's log."""
        return max(1, round(self.cfg.log_flush_seconds / self.FLUSH_TICK_SECONDS))

    def due(self, tick: int) -> list[tuple[str, PredictionLogWriter]]:
        """The tenants whose log is written at ``tick``: those whose turn it is in the period,
        and those with ``log_flush_rows`` rows or labels waiting."""
        period = self.flush_period
        turn = tick % period
        bound = self.cfg.log_flush_rows
        return [
            (tenant, writer)
            for tenant, writer in list(self.writers.items())
            if self._turns[tenant] == turn or writer.buffered >= bound
        ]

    def _flush_loop(self) -> None:
        tick = 0
        while not self._stopping.wait(min(self.FLUSH_TICK_SECONDS, self.cfg.log_flush_seconds)):
            tick += 1
            self.flush_due(tick)

    def flush_due(self, tick: int) -> None:
        """Write the logs of the tenants ``due`` at ``tick`` (on the flush thread)."""
        writers = self.due(tick)
        if not writers:
            return
        try:
            prepared = prepare_flush([writer for _, writer in writers])
        except Exception:  # e.g. out of memory: each tenant converts its own rows
            log.exception("prediction logs of the tenants not converted together")
            prepared = [None] * len(writers)
        for (tenant, writer), ready in zip(writers, prepared, strict=True):
            try:
                writer.flush(ready)
            except Exception as exc:  # one tenant's failing disk must not stop the others' logs
                writer.last_error = str(exc)
                log.exception("prediction log flush of tenant %s failed (rows kept, retrying)", tenant)

    def stop(self) -> None:
        """Flush every tenant's log (blocking) and release every model."""
        self._stopping.set()
        if self._flusher is not None:
            self._flusher.join(timeout=60)
        for writer in self.writers.values():
            writer.stop()
        self.pool.close()
        for lane in self.lanes:
            lane.stop()
