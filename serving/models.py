"""Loaded model versions: a scoring thread per version and a pool under a memory budget.

``ModelWorker`` runs one version's ONNX Runtime session in its own thread. Requests are
submitted from the event loop and answered through asyncio futures; rows that queue up
while the session is busy are scored together (micro-batching), so under concurrency the
per-request cost of the thread hand-off is shared. A model call that outlives its deadline
is answered ``ModelTimeout`` by ``expire`` (run from the event loop's watchdog), and the
ONNX Runtime run itself is stopped through its ``RunOptions.terminate`` flag, so a hung
model costs one timeout, not a thread forever. Scoring never runs on the event loop: a
slow model cannot stall health checks, admin calls or other versions.

Shadow traffic (copies of requests whose answer nobody waits for) goes through a second
worker of the same session, the version's *mirror lane*, whose thread runs at a lower OS
scheduling priority (``nice``): when the cores are busy, users' requests are scored
first and the mirrored ones wait (and are shed by the runtime's ``shadow_max_pending``
bound) instead of taking CPU from the primary path.

``ModelPool`` holds every loaded version, least recently used first. Versions in a slot
are pinned; others are evicted when the pool exceeds its memory budget. Every request
holds a reference (``acquire``/``release``) while it uses a model, and an evicted or
replaced model is closed only when its last reference is released, so eviction never
races an in-flight request. All pool and future bookkeeping happens on the event loop
thread; only ``ModelWorker._run`` runs elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from mlops.features import FeatureSet
from mlops.onnx_model import PROBA_OUTPUT, OnnxScorer
from mlops.settings import DatasetSchema
from serving.errors import BudgetExceeded, ModelFailed, ModelTimeout

log = logging.getLogger(__name__)

MEMORY_FACTOR = 2.0
"""A loaded session is charged ``MEMORY_FACTOR`` x its ONNX size (ONNX Runtime keeps the
graph plus its own copies of the initializers). An estimate, deterministic on purpose:
resident-memory deltas measured around a load are dominated by allocator noise and by
whatever else the process does at the same time."""

_STOP = object()


@dataclass(eq=False)
class Prefix:
    """The preprocessing part of models cut by ``mlops.onnx_model.estimator_split``: one
    session for every model whose prefix has the same bytes, computing the tensor ``cut``."""

    session: ort.InferenceSession
    cut: str


@dataclass(eq=False)
class Head:
    """A model's estimator part (after its ``prefix``): scores ``prefix.cut`` rows."""

    prefix: Prefix
    session: ort.InferenceSession


class _Item:
    __slots__ = (
        "future",
        "columns",
        "rows",
        "deadline",
        "expired",
        "finished",
        "scorer",
        "key",
        "windows",
        "head",
    )

    def __init__(
        self,
        future: asyncio.Future,
        columns: Mapping[str, list],
        rows: int,
        deadline: float,
        scorer: OnnxScorer | None = None,
        key: str | None = None,
        windows: tuple[str, ...] = (),
        head: Head | None = None,
    ):
        self.future = future
        self.head = head  # a SharedLane's item: its model cut in two, when it could be
        self.windows = windows  # a SharedLane's item: the window-feature inputs of its model
        self.columns = columns
        self.rows = rows
        self.deadline = deadline
        self.scorer = scorer  # a SharedLane's item: the session that scores it
        self.key = key  # a SharedLane's item: whose queue it waits in (the tenant)
        self.expired = False  # set on the loop thread, read by the worker: skip if still queued
        self.finished = False


class ModelWorker:
    """One version's scoring thread with micro-batching and deadline enforcement.

    ``windows`` are the model's window-feature inputs (numeric, fed from the columns of the
    same names) besides the dataset features ``scorer`` feeds."""

    def __init__(
        self,
        scorer: OnnxScorer,
        label: str,
        max_batch_rows: int = 64,
        *,
        nice: int = 0,
        windows: tuple[str, ...] = (),
    ):
        self.scorer = scorer
        self.windows = windows
        self.label = label
        self.max_batch_rows = max_batch_rows
        self.nice = nice  # added to the thread's scheduling niceness when it starts (Linux: per thread)
        self.outstanding: deque[_Item] = deque()  # loop thread only, FIFO
        self._pending: deque = deque()  # loop thread appends, scoring thread pops
        # Wake-ups of an idle thread go through a pipe: os.write/os.read release the GIL
        # around the system call, so the woken thread never waits on a GIL held by a waker
        # stuck in its own wake-up (a futex wake under the GIL, as with queue.SimpleQueue,
        # cost about a tenth of the event loop's time at full load).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._idle = False
        self._wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_options: ort.RunOptions | None = None
        self.running_since = 0.0  # monotonic start of the batch being scored, 0 when idle
        self._thread = threading.Thread(target=self._run, name=f"score-{label}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ loop side

    def submit(
        self,
        columns: Mapping[str, list],
        rows: int,
        deadline: float,
        scorer: OnnxScorer | None = None,
        key: str | None = None,
        windows: tuple[str, ...] = (),
        head: Head | None = None,
    ) -> asyncio.Future:
        """Queue ``rows`` rows (feature -> values); the future gets the ``[rows, 2]`` probabilities.
        ``scorer``, ``key``, ``windows`` and ``head`` (the session, the tenant, the model's
        window inputs and its split parts) are for a ``SharedLane`` only."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        item = _Item(future, columns, rows, deadline, scorer, key, windows, head)
        self.outstanding.append(item)
        self._enqueue(item)
        return future

    def _enqueue(self, item: object) -> None:
        # Wake the thread only when it sleeps, and at most once per event-loop turn: the
        # requests parsed in the same turn go to the thread together. A wake is a futex call
        # made while holding the GIL, and the woken thread then competes for the GIL with
        # the loop; once per request it cost more CPU than the model call itself.
        self._pending.append(item)
        if self._idle and not self._wake_scheduled:
            self._wake_scheduled = True
            loop = self._loop
            if loop is not None and loop.is_running():
                loop.call_soon(self._wake_now)
            else:
                self._wake_now()

    def _wake_now(self) -> None:
        self._wake_scheduled = False
        if self._idle and not self._closed:
            self._idle = False
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def expire(self, now: float, timeout: float) -> int:
        """Answer ``ModelTimeout`` to every request past its deadline; stop a run over ``timeout``."""
        expired = 0
        for item in self.outstanding:
            if item.deadline > now:
                break  # FIFO with equal timeouts: later items have later deadlines
            if not item.future.done():
                item.expired = True
                item.future.set_exception(
                    ModelTimeout(f"model {self.label} did not answer within the timeout")
                )
                expired += 1
        opts = self._run_options
        started = self.running_since
        if opts is not None and started and now - started > timeout:
            opts.terminate = True
        return expired

    def _resolve(
        self, batch: list[_Item], groups: list[tuple[list[_Item], np.ndarray | BaseException]]
    ) -> None:
        for live, result in groups:
            offset = 0
            for item in live:
                n = item.rows
                if not item.future.done():
                    if isinstance(result, BaseException):
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(result[offset : offset + n])
                offset += n
        for item in batch:
            item.finished = True
            if not item.future.done():  # expired while queued and skipped by the worker
                item.future.set_exception(
                    ModelTimeout(f"model {self.label} did not answer within the timeout")
                )
        out = self.outstanding
        while out and out[0].finished:
            out.popleft()

    def stop(self) -> None:
        """Let the thread finish what is queued, then end."""
        self._enqueue(_STOP)

    # ------------------------------------------------------------ thread side

    def _wait(self) -> None:
        """Block until something is queued."""
        pending = self._pending
        while not pending:
            self._idle = True
            if pending:  # appended between the check and the flag: no token is coming
                self._idle = False
                break
            os.read(self._wake_r, 64)  # a stale token only makes one extra, empty turn

    def _next_batch(self) -> tuple[list[_Item], bool]:
        """Block until work is queued; then up to ``max_batch_rows`` rows of it (and whether to stop)."""
        pending = self._pending
        self._wait()
        batch: list[_Item] = []
        rows = 0
        while pending and rows < self.max_batch_rows:
            item = pending.popleft()
            if item is _STOP:
                return batch, True
            batch.append(item)
            rows += item.rows
        return batch, False

    def _score_batch(self, live: list[_Item]) -> list[tuple[list[_Item], np.ndarray | BaseException]]:
        """The batch's rows scored in one session run: ``[(items, probabilities or error)]``."""
        return [(live, self._score(live, self.scorer, self.windows))]

    def _score(
        self,
        live: list[_Item],
        scorer: OnnxScorer,
        windows: tuple[str, ...],
        feeds: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray | BaseException:
        """``live``'s rows scored in one run of ``scorer``; ``feeds``, when given, are the
        dataset features' feeds of exactly these rows (then only window inputs are built)."""
        needed = live[0].columns if feeds is None else windows
        if len(live) == 1:
            columns = live[0].columns
        else:
            columns = {name: [v for item in live for v in item.columns[name]] for name in needed}
        try:
            feeds = scorer.feeds(columns) if feeds is None else dict(feeds)
            for name in windows:
                feeds[name] = np.asarray(columns[name], dtype=np.float32).reshape(-1, 1)
        except Exception as exc:
            return self._failed(exc)
        return self._run_session(scorer.session, PROBA_OUTPUT, feeds)

    def _run_session(self, session: ort.InferenceSession, output: str, feeds: dict[str, np.ndarray]) -> Any:
        """``output`` of one run of ``session`` (stoppable by ``expire``), or the error to answer."""
        opts = ort.RunOptions()
        opts.log_severity_level = 4  # a terminated run is reported as ModelTimeout, not logged
        try:
            self._run_options = opts
            self.running_since = time.monotonic()
            return session.run([output], feeds, opts)[0]
        except Exception as exc:
            if opts.terminate:
                return ModelTimeout(f"model {self.label} was stopped after exceeding the timeout")
            return self._failed(exc)
        finally:
            self.running_since = 0.0
            self._run_options = None

    def _failed(self, exc: Exception) -> ModelFailed:
        log.error("model %s failed on validated input: %s", self.label, exc)
        return ModelFailed(f"model {self.label} failed: {str(exc).splitlines()[0][:200]}")

    def _run(self) -> None:
        if self.nice > 0:
            try:  # on Linux a thread has its own niceness, addressed by its thread id
                os.setpriority(
                    os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice
                )
            except (
                OSError,
                AttributeError,
            ) as exc:  # no per-thread priority here: the lane runs at normal priority
                log.warning("model %s: cannot lower the priority of its thread (%s)", self.label, exc)
        try:
            self._serve()
        finally:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _serve(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            if not batch:
                continue
            live = [item for item in batch if not item.expired]
            groups = self._score_batch(live) if live else []
            loop = self._loop
            if loop is None or loop.is_closed():
                return
            try:
                loop.call_soon_threadsafe(self._resolve, batch, groups)
            except RuntimeError:  # loop closed during shutdown
                return


def _prefix_of(items: list[_Item]) -> Prefix | None:
    """The shared prefix of the model scoring ``items`` (None: not split, or window inputs)."""
    head = items[0].head
    return head.prefix if head is not None and not items[0].windows else None


def pick_lane(lanes: list[SharedLane], key: str) -> SharedLane:
    """The lane for ``key``'s next request: a lane whose idle thread is already being woken in
    this event-loop turn (the request joins that batch: one wake-up and one hand-off for all
    requests parsed in the turn, as on a single model's worker), else the one with the fewest
    unanswered requests (the first on a tie); never a lane that would give ``key`` requests
    on every lane: one tenant cannot hold all threads, e.g. with a slow model."""
    if len(lanes) == 1:
        return lanes[0]
    mine = [lane for lane in lanes if key in lane.queued_by_key]
    allowed = mine if len(mine) >= len(lanes) - 1 else lanes
    for lane in allowed:
        if lane.waking:
            return lane
    return min(allowed, key=lambda lane: len(lane.outstanding))


class SharedLane(ModelWorker):
    """One scoring thread shared by many models (tenants' models), fair between tenants.

    Items carry their own session (``submit(..., scorer=, key=tenant)``). The thread moves
    what the event loop queued into one queue per tenant and fills each batch round-robin,
    one request per tenant in turn (the tenant served last goes to the back), so a tenant
    with many requests waiting delays another tenant's request by at most one batch. A batch
    is scored as one session run per model in it, and answered in one hand-off to the loop:
    requests spread over many models share a wake-up instead of waking a thread each.
    """

    def __init__(self, label: str, max_batch_rows: int = 64):
        self._queues: OrderedDict[str | None, deque[_Item]] = OrderedDict()  # scoring thread only
        self._stopping = False
        self.queued_by_key: dict[str | None, int] = {}  # loop thread only: unanswered requests per tenant
        super().__init__(None, label, max_batch_rows)  # type: ignore[arg-type]

    @property
    def waking(self) -> bool:
        """The thread sleeps and a wake-up is scheduled for the end of this event-loop turn:
        what is queued now is scored in the batch it wakes for (loop thread only)."""
        return self._wake_scheduled

    def _enqueue(self, item: object) -> None:
        if isinstance(item, _Item):
            self.queued_by_key[item.key] = self.queued_by_key.get(item.key, 0) + 1
        super()._enqueue(item)

    def _resolve(
        self, batch: list[_Item], groups: list[tuple[list[_Item], np.ndarray | BaseException]]
    ) -> None:
        counts = self.queued_by_key
        for item in batch:
            left = counts[item.key] - 1
            if left:
                counts[item.key] = left
            else:
                del counts[item.key]
        super()._resolve(batch, groups)

    def _next_batch(self) -> tuple[list[_Item], bool]:
        queues = self._queues
        pending = self._pending
        if not queues:
            self._wait()
        while pending:
            item = pending.popleft()
            if item is _STOP:
                self._stopping = True  # nothing is queued after it; finish what is
                continue
            queue = queues.get(item.key)
            if queue is None:
                queue = queues[item.key] = deque()
            queue.append(item)
        batch: list[_Item] = []
        rows = 0
        while queues and rows < self.max_batch_rows:
            for key in list(queues):
                queue = queues[key]
                item = queue.popleft()
                batch.append(item)
                rows += item.rows
                if queue:
                    queues.move_to_end(key)
                else:
                    del queues[key]
                if rows >= self.max_batch_rows:
                    break
        return batch, self._stopping and not queues

    def _score_batch(self, live: list[_Item]) -> list[tuple[list[_Item], np.ndarray | BaseException]]:
        """One run per session in the batch; models sharing a ``Prefix`` (two or more in the
        batch) instead get one prefix run for all their rows, then one head run each."""
        by_scorer: dict[int, list[_Item]] = {}
        for item in live:
            by_scorer.setdefault(id(item.scorer), []).append(item)
        groups = sorted(by_scorer.values(), key=lambda items: id(_prefix_of(items)))  # a prefix's together
        shared = self._shared_feeds(groups) if len(groups) > 1 else None
        out: list[tuple[list[_Item], np.ndarray | BaseException]] = []
        start = i = 0
        while i < len(groups):
            prefix = _prefix_of(groups[i]) if shared is not None else None
            j = i + 1
            while prefix is not None and j < len(groups) and _prefix_of(groups[j]) is prefix:
                j += 1
            sizes = [sum(item.rows for item in items) for items in groups[i:j]]
            feeds = None
            if shared is not None:
                end = start + sum(sizes)
                feeds = {name: array[start:end] for name, array in shared.items()}
                start = end
            if j - i > 1:
                out.extend(self._score_split(groups[i:j], sizes, prefix, feeds))  # type: ignore[arg-type]
            else:
                items = groups[i]
                out.append((items, self._score(items, items[0].scorer, items[0].windows, feeds)))  # type: ignore[arg-type]
            i = j
        return out

    def _score_split(
        self, groups: list[list[_Item]], sizes: list[int], prefix: Prefix, feeds: dict[str, np.ndarray]
    ) -> list[tuple[list[_Item], np.ndarray | BaseException]]:
        """``groups``' rows (``sizes`` each, ``feeds`` of all of them in order) through one run
        of ``prefix`` and each group's head on its rows; when the prefix run fails, each group
        is scored on its own session (so an error is its own)."""
        cut = self._run_session(prefix.session, prefix.cut, feeds)
        out: list[tuple[list[_Item], np.ndarray | BaseException]] = []
        start = 0
        for items, n in zip(groups, sizes, strict=True):
            if isinstance(cut, BaseException):
                own = {name: array[start : start + n] for name, array in feeds.items()}
                out.append((items, self._score(items, items[0].scorer, (), own)))  # type: ignore[arg-type]
            else:
                head: Head = items[0].head  # type: ignore[assignment]
                out.append(
                    (
                        items,
                        self._run_session(head.session, PROBA_OUTPUT, {prefix.cut: cut[start : start + n]}),
                    )
                )
            start += n
        return out

    @staticmethod
    def _shared_feeds(groups: list[list[_Item]]) -> dict[str, np.ndarray] | None:
        """The dataset features' feeds of every row of ``groups`` (group after group), built
        in one conversion instead of one per session; None when the sessions do not share
        one dataset schema or a value does not convert (each group then builds its own, so a
        bad row fails only its own group)."""
        scorer: OnnxScorer = groups[0][0].scorer  # type: ignore[assignment]
        schema = scorer.schema
        if any(items[0].scorer.schema is not schema for items in groups):  # type: ignore[union-attr]
            return None
        names = (*schema.numeric_names, *schema.categorical_names)
        columns = {
            name: [v for items in groups for item in items for v in item.columns[name]] for name in names
        }
        try:
            return scorer.feeds(columns)
        except Exception:
            return None


# --------------------------------------------------------------------------- pool


@dataclass(eq=False)
class LoadedModel:
    """One version in the pool: its scorer, worker, charged memory and reference count."""

    name: str
    version: int
    scorer: OnnxScorer
    worker: ModelWorker
    nbytes: int
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    refs: int = 0
    retired: bool = False
    closed: bool = False
    mirror: ModelWorker | None = None  # the mirror lane, started on the first mirrored request
    owns_worker: bool = True  # False on a SharedLane: closing the model leaves the lane running
    windows: tuple[str, ...] = ()  # the window features the model takes besides the dataset's
    view: FeatureSet | None = None  # the declared feature view those are computed by (None: no windows)
    head: Head | None = None  # on a SharedLane: the model cut in two, its prefix shared

    def mirror_worker(self, nice: int) -> ModelWorker:
        """The worker for mirrored (shadow) requests: the same session on a second thread
        running ``nice`` steps below normal priority (``nice=0``: the model's own worker)."""
        if nice <= 0:
            return self.worker
        if self.mirror is None:
            self.mirror = ModelWorker(
                self.scorer,
                f"{self.worker.label} mirror",
                self.worker.max_batch_rows,
                nice=nice,
                windows=self.windows,
            )
        return self.mirror

    @property
    def workers(self) -> tuple[ModelWorker, ...]:
        """The model's worker, plus the mirror worker once it is started."""
        return (self.worker,) if self.mirror is None else (self.worker, self.mirror)

    def acquire(self) -> LoadedModel:
        """Take a reference for one request and mark the version recently used; the model."""
        self.refs += 1
        self.last_used = time.monotonic()
        return self

    def release(self) -> None:
        """Drop one request's reference; a retired model closes with its last one."""
        self.refs -= 1
        if self.retired and self.refs == 0:
            self.close()

    def close(self) -> None:
        """Stop the workers (once)."""
        if not self.closed:
            self.closed = True
            for worker in self.workers:
                if worker is not self.worker or self.owns_worker:
                    worker.stop()

    def describe(self) -> dict[str, Any]:
        """Version, charged bytes, references, load time and idle time, for the admin state."""
        return {
            "version": self.version,
            "bytes": self.nbytes,
            "refs": self.refs,
            "loaded_at": self.loaded_at,
            "idle_seconds": round(time.monotonic() - self.last_used, 3),
        }


def build_model(
    name: str,
    version: int,
    onnx: bytes,
    schema: DatasetSchema,
    *,
    threads: int = 1,
    max_batch_rows: int = 64,
    warmup_timeout: float = 10.0,
    declared_windows: tuple[str, ...] = (),
    lane: SharedLane | None = None,
) -> LoadedModel:
    """Create the session (blocking; run it off the event loop), score one warm-up row, start
    its worker (or, given ``lane``, score on that shared thread). A model that cannot answer
    the warm-up row within ``warmup_timeout`` seconds is refused (``ModelFailed``): it would
    only ever time out in service.

    Graph inputs beyond the dataset's features must be among ``declared_windows`` (the
    windows of the model's feature view); they become the model's ``windows``, else it is
    refused."""
    scorer = OnnxScorer(onnx, schema, threads=threads)
    extra = [i.name for i in scorer.session.get_inputs() if i.name not in set(schema.input_names.values())]
    unknown = [n for n in extra if n not in declared_windows]
    if unknown:
        raise ModelFailed(
            f"{name} v{version} takes inputs {', '.join(unknown)} that are neither dataset features nor "
            "windows of its declared feature view (features.windows or features.extra_views)"
        )
    windows = tuple(n for n in declared_windows if n in extra)
    warm = {n: [0.0] for n in schema.numeric_names} | {f.name: [f.categories[0]] for f in schema.categorical}
    opts = ort.RunOptions()
    opts.log_severity_level = 4
    timer = threading.Timer(warmup_timeout, setattr, (opts, "terminate", True))
    timer.start()
    try:
        feeds = scorer.feeds(warm) | {n: np.zeros((1, 1), np.float32) for n in windows}
        scorer.session.run([PROBA_OUTPUT], feeds, opts)
    except Exception as exc:
        if opts.terminate:
            raise ModelFailed(
                f"{name} v{version} did not answer its warm-up row within {warmup_timeout:g} s"
            ) from None
        raise ModelFailed(
            f"{name} v{version} failed on its warm-up row: {str(exc).splitlines()[0][:200]}"
        ) from None
    finally:
        timer.cancel()
    nbytes = int(len(onnx) * MEMORY_FACTOR)
    if lane is not None:
        return LoadedModel(name, version, scorer, lane, nbytes, owns_worker=False, windows=windows)
    worker = ModelWorker(scorer, f"{name} v{version}", max_batch_rows, windows=windows)
    return LoadedModel(name, version, scorer, worker, nbytes, windows=windows)


class ModelPool:
    """Loaded versions, least recently used first, within ``budget_bytes`` (pinned ones excepted).

    ``loader(version)`` builds a ``LoadedModel`` (blocking IO and CPU: it runs in a thread);
    concurrent requests for the same version share one load.
    """

    def __init__(self, loader: Callable[[int], LoadedModel], budget_bytes: int):
        self._loader = loader
        self.budget_bytes = budget_bytes
        self._models: OrderedDict[int, LoadedModel] = OrderedDict()
        self._loading: dict[int, asyncio.Future] = {}
        self._retired: list[LoadedModel] = []
        self.pinned: frozenset[int] = frozenset()
        self.evictions = 0

    def get(self, version: int) -> LoadedModel | None:
        """The loaded version, now the most recently used, or None when it is not in the pool."""
        model = self._models.get(version)
        if model is not None:
            self._models.move_to_end(version)
        return model

    def __contains__(self, version: int) -> bool:
        return version in self._models

    @property
    def models(self) -> list[LoadedModel]:
        """The loaded versions, least recently used first."""
        return list(self._models.values())

    @property
    def workers(self) -> Iterable[ModelWorker]:
        """The workers of every loaded version and of evicted ones still in use."""
        self._retired = [m for m in self._retired if not m.closed]
        return [w for m in (*self._models.values(), *self._retired) for w in m.workers]

    @property
    def loaded_bytes(self) -> int:
        """Memory charged to the versions in the pool (what the budget is checked against)."""
        return sum(m.nbytes for m in self._models.values())

    @property
    def used_bytes(self) -> int:
        """``loaded_bytes`` plus evicted versions still held by in-flight requests (freed with
        their last request, within one request timeout)."""
        return self.loaded_bytes + sum(m.nbytes for m in self._retired if not m.closed)

    def add(self, model: LoadedModel) -> None:
        """Insert a model built outside ``load`` (start-up, before the event loop serves)."""
        if self._models.get(model.version) is not model:
            self._models[model.version] = model
        self._models.move_to_end(model.version)
        self._shrink(keep=model.version)

    async def load(self, version: int, *, required: bool) -> LoadedModel:
        """The version, loaded if need be. ``required`` (slot loads) may exceed the budget
        once nothing is evictable; an optional load then raises ``BudgetExceeded``."""
        model = self.get(version)
        if model is not None:
            return model
        pending = self._loading.get(version)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[version] = pending
            try:
                model = await asyncio.to_thread(self._loader, version)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: waiters re-raise it
                raise
            finally:
                self._loading.pop(version, None)
            self._models[version] = model
            self._shrink(keep=version)
            if not required and self.loaded_bytes > self.budget_bytes:
                self._retire(self._models.pop(version))
                exc = BudgetExceeded(
                    f"loading v{version} ({model.nbytes / 2**20:.1f} MiB) exceeds the model memory budget "
                    f"({self.budget_bytes / 2**20:.0f} MiB) with every loaded version in use or in a slot"
                )
                pending.set_exception(exc)
                pending.exception()
                raise exc
            pending.set_result(model)
            return model
        return await asyncio.shield(pending)

    def pin(self, versions: Iterable[int]) -> None:
        """Versions in a slot: never evicted. Unpinning may evict at once if over budget."""
        self.pinned = frozenset(versions)
        self._shrink()

    def _shrink(self, keep: int | None = None) -> None:
        for version in list(self._models):  # least recently used first
            if self.loaded_bytes <= self.budget_bytes:
                return
            if version in self.pinned or version == keep:
                continue
            log.info("evicting model v%s (least recently used) to stay within the memory budget", version)
            self.evictions += 1
            self._retire(self._models.pop(version))

    def _retire(self, model: LoadedModel) -> None:
        model.retired = True
        if model.refs == 0:
            model.close()
        else:
            self._retired.append(model)

    def close(self) -> None:
        """Retire and close every model, in the pool or evicted."""
        for model in (*self._models.values(), *self._retired):
            model.retired = True
            model.close()
        self._models.clear()
        self._retired.clear()
