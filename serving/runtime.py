"""The online service's state and behaviour, independent of the web framework.

``ServingRuntime`` holds the current ``ServingState`` (a route table plus the model in each
slot), the model pool, the prediction-log writer and the metrics. The HTTP layer
(``serving.app``) parses and validates requests and calls into it.

Atomic changes. A request reads ``runtime.state`` once and uses that object to the end, and
an admin change builds a complete new state (loading any new version first, off the event
loop) and replaces the reference in one assignment. So a request sees the old routes and
slots or the new ones, never a mix; it holds a reference on each model it uses, so a model
replaced or evicted meanwhile is closed only after the request is answered. Nothing is
dropped or failed by a hot swap or a blue-green flip.

Shadow. In shadow mode the sampled requests are submitted to the candidate after the
stable answer is ready and the response does not wait for them: the candidate's answer is
only logged (``role='shadow'``, same ``request_id``), counted in metrics, and never
returned. A bounded number of mirror copies may be pending; beyond it copies are skipped
(and counted) rather than letting the candidate slow the stable path down.

The service exposes state and applies what it is told; it never decides a rollout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np

from mlops.errors import DataError, ModelError
from mlops.features import FeatureSet, FeatureViewMismatch, check_view, model_view
from mlops.onnx_model import PROBA_OUTPUT
from mlops.predlog import PRIMARY, SHADOW, RequestIds
from mlops.request_validation import InvalidRequest, Record, RequestValidator, V2Request
from mlops.routing import CANDIDATE, STABLE, InvalidRouteTable, Mode, RouteTable, route
from mlops.settings import Settings
from serving.auth import ensure_feedback_token, ensure_id_key, ensure_token
from serving.errors import (
    Conflict,
    FeaturesUnavailable,
    LabelConflict,
    ModelFailed,
    NotReady,
    Overloaded,
    ServingError,
    StateNotSaved,
    UnknownModel,
    UnknownRequest,
    UnusableModel,
)
from serving.first_labels import INDEX_FILE as FIRST_LABELS_FILE
from serving.first_labels import MAIN as MAIN_LABELS
from serving.first_labels import FirstLabels, tenant_scope
from serving.metrics import ServingMetrics
from serving.models import LoadedModel, ModelPool, SharedLane, build_model
from serving.online_features import OnlineFeatures
from serving.predlog_store import PredictionLogStore, feedback_dir, predictions_dir
from serving.predlog_writer import LogRow, PredictionLogWriter
from serving.source import ModelSource, RegistryAliases, RegistrySource
from serving.state import DesiredState, RoutesSpec, load_state, save_state, state_path
from serving.tenants import TenantModels

log = logging.getLogger(__name__)

NEEDS_CANDIDATE = frozenset({Mode.SHADOW, Mode.CANARY, Mode.AB, Mode.BLUE_GREEN})


@dataclass(frozen=True, slots=True)
class ServingState:
    """Routes and slots as one immutable value; replaced whole by every admin change."""

    table: RouteTable
    stable: LoadedModel | None
    candidate: LoadedModel | None
    generation: int = 0
    applied_at: float = 0.0
    applied_key: str | None = None

    def slot(self, variant: str) -> LoadedModel | None:
        """The model in ``variant``'s slot (stable or candidate), or None when it is empty."""
        return self.stable if variant == STABLE else self.candidate

    def models(self) -> tuple[LoadedModel, ...]:
        """The models in the slots, stable's first."""
        return tuple(m for m in (self.stable, self.candidate) if m is not None)

    def versions(self) -> set[int]:
        """The versions in the two slots."""
        return {m.version for m in (self.stable, self.candidate) if m is not None}

    def desired(self) -> DesiredState | None:
        """The state as ``DesiredState``, or None before a stable version is loaded."""
        if self.stable is None:
            return None
        return DesiredState(
            **RoutesSpec.of(self.table).model_dump(),
            stable_version=self.stable.version,
            candidate_version=self.candidate.version if self.candidate else None,
        )


class _Group:
    """Rows of one request that go to one model."""

    __slots__ = ("variant", "model", "index", "future", "probs", "error")

    def __init__(self, variant: str, model: LoadedModel, index: list[int]):
        self.variant = variant
        self.model = model
        self.index = index
        self.future: asyncio.Future | None = None
        self.probs: np.ndarray | None = None
        self.error: ServingError | None = None


class ServingRuntime:
    """Routes, slots, pool, prediction log and metrics of one service process."""

    def __init__(
        self,
        settings: Settings,
        source: ModelSource,
        *,
        token: str,
        feedback_token: str,
        id_key: bytes,
        sources: Callable[[str], ModelSource] | None = None,
    ):
        cfg = settings.serving
        self.settings = settings
        self.cfg = cfg
        self.source = source
        self.token = token
        self.feedback_token = feedback_token
        self.ids = RequestIds(id_key)
        self.first_labels = FirstLabels(settings.run_dir / FIRST_LABELS_FILE)  # later labels refused
        self.model_name = cfg.model_name or settings.training.model_name
        self.threshold = cfg.decision_threshold or settings.training.decision_threshold
        self.timeout = cfg.request_timeout_seconds
        self.feature_names = settings.dataset.feature_names
        self.online = OnlineFeatures.for_settings(settings)
        self.windows = self.online.keys.windows if self.online is not None else ()  # of every view
        self.validator = RequestValidator(
            settings.dataset,
            enforce_ranges=cfg.enforce_feature_ranges,
            max_rows=cfg.max_batch_rows,
            online=self.online.keys if self.online is not None else None,
        )
        self.metrics = ServingMetrics()
        self.pool = ModelPool(self._build, int(cfg.model_memory_budget_mb * 2**20))
        self.writer = PredictionLogWriter(
            predictions_dir(settings),
            feedback_dir(settings),
            settings.dataset,
            flush_seconds=cfg.log_flush_seconds,
            flush_rows=cfg.log_flush_rows,
            max_buffer_rows=cfg.log_max_buffer_rows,
            on_flush=lambda n, _f: self.metrics.log_rows.inc(n),
            on_feedback=partial(self.first_labels.written, MAIN_LABELS),
        )
        self.state = ServingState(RouteTable(), None, None)
        self.state_file = state_path(settings)
        self.inflight = 0
        self.shadow_pending = 0
        self.idempotency: OrderedDict[str, tuple[str, int, dict[str, Any]]] = OrderedDict()
        self._admin_lock: asyncio.Lock | None = None
        self._watchdog: asyncio.Task | None = None
        self.tenants: TenantModels | None = None
        if cfg.tenants.enabled:
            self.tenants = TenantModels(
                settings,
                sources or partial(RegistrySource, settings),
                self._build_named,
                id_key,
                aliases=None if sources else RegistryAliases(settings).resolve_all,
                first_labels=self.first_labels,
            )

    @classmethod
    def for_model(cls, settings: Settings, model_name: str) -> ServingRuntime:
        """The runtime serving ``model_name`` from the registry, with the admin and feedback
        tokens and the request-id key of ``settings`` (read, or created in MLOPS_HOME)."""
        return cls(
            settings,
            RegistrySource(settings, model_name),
            token=ensure_token(settings),
            feedback_token=ensure_feedback_token(settings),
            id_key=ensure_id_key(settings),
        )

    # ------------------------------------------------------------------ lifecycle

    def _build(self, version: int) -> LoadedModel:
        return self._build_named(
            self.model_name, version, self.source.onnx(version), tags=self.source.tags(version)
        )

    def _build_named(
        self,
        name: str,
        version: int,
        onnx: bytes,
        lane: SharedLane | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> LoadedModel:
        """Build and warm up version ``version`` of model ``name`` (the served one, or a
        tenant's scoring on the shared ``lane``). The model's window inputs are those of the
        feature view its lineage names, which must be declared (``features.windows`` or one of
        ``features.extra_views``); a version of another view is refused, since its inputs
        would be filled with features computed differently from its training. A version
        without a lineage view takes the windows of ``features.windows``."""
        online = self.online
        try:
            trained_on = check_view(
                online.views if online is not None else None, model_view(tags or {}), f"{name} v{version}"
            )
            view = trained_on or (online.fs if online is not None else None)
            model = build_model(
                name,
                version,
                onnx,
                self.settings.dataset,
                threads=self.cfg.ort_threads,
                max_batch_rows=self.cfg.micro_batch_rows,
                warmup_timeout=max(10.0, self.timeout),
                declared_windows=view.names if view is not None else (),
                lane=lane,
            )
        except (ModelError, ModelFailed, DataError, FeatureViewMismatch) as exc:
            raise UnusableModel(f"version {version} of '{name}' cannot be served: {exc}") from None
        model.view = view if model.windows else None
        return model

    def _initial(self) -> tuple[DesiredState | None, int, str]:
        if self.cfg.restore_state:
            restored = load_state(self.state_file, self.model_name)
            if restored is not None:
                return restored[0], restored[1], f"restored from {self.state_file}"
        stable = self.source.resolve(self.cfg.stable_alias)
        if stable is None:
            return None, 0, f"'{self.model_name}@{self.cfg.stable_alias}' is not set"
        candidate = self.source.resolve(self.cfg.candidate_alias) if self.cfg.candidate_alias else None
        desired = DesiredState(stable_version=stable, candidate_version=candidate)
        return (
            desired,
            0,
            f"from aliases {self.cfg.stable_alias}"
            + (f" and {self.cfg.candidate_alias}" if self.cfg.candidate_alias else ""),
        )

    def bootstrap(self) -> str:
        """Load the starting slots and the labels already recorded (blocking: called once,
        before serving). Returns what was loaded."""
        self.load_labels()
        if self.online is not None:
            log.info("online window features: %s", self.online.prepare())
        desired, generation, origin = self._initial()
        if desired is None:
            log.warning(
                "no model to serve yet (%s): not ready until a version is loaded via the admin API", origin
            )
            return f"nothing loaded: {origin}"
        try:
            self._apply_sync(desired, generation)
        except (UnknownModel, UnusableModel) as exc:
            if not origin.startswith("restored"):
                raise
            log.warning("persisted serving state is stale (%s); starting from the registry aliases", exc)
            self.cfg = self.cfg.model_copy(update={"restore_state": False})
            return self.bootstrap()
        return f"{self.describe_routes()} ({origin})"

    def _apply_sync(self, desired: DesiredState, generation: int) -> None:
        table = desired.table()
        models = {}
        self.pool.pin({v for v in (desired.stable_version, desired.candidate_version) if v is not None})
        for slot, version in ((STABLE, desired.stable_version), (CANDIDATE, desired.candidate_version)):
            if version is None:
                models[slot] = None
                continue
            model = self.pool.get(version) or self._build(version)
            self.pool.add(model)
            models[slot] = model
        self._check_slots(table, models[CANDIDATE])
        self.state = ServingState(table, models[STABLE], models[CANDIDATE], generation, time.time(), None)
        self.pool.pin(self.state.versions())
        self._export_state()

    def start(self) -> None:
        """Start the background work that needs the event loop (watchdog) and the log writer."""
        self.writer.start()
        if self.online is not None:
            self.online.start()
        self._admin_lock = asyncio.Lock()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="serving-watchdog")

    async def stop(self) -> None:
        """Flush the prediction log and release every model (after in-flight requests ended)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self.writer.stop)
        if self.online is not None:
            await self.online.stop()
        self.pool.close()
        if self.tenants is not None:
            await asyncio.to_thread(self.tenants.stop)

    async def _watch(self) -> None:
        tick = min(0.1, max(0.01, self.timeout / 20))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            workers = self.pool.workers
            if self.tenants is not None:
                workers = [*workers, *self.tenants.lanes]
            for worker in workers:
                if worker.outstanding or worker.running_since:
                    worker.expire(now, self.timeout)

    @property
    def ready(self) -> bool:
        """Whether a stable version is loaded, so requests can be served."""
        return self.state.stable is not None

    # ------------------------------------------------------------------ scoring

    def _log(
        self,
        rid: str,
        entity: str | None,
        variant: str,
        role: str,
        mode: str,
        model: LoadedModel,
        score: float | None,
        latency_ms: float,
        status: int,
        error: str | None,
        features: Mapping[str, Any],
        forced: bool = False,
    ) -> None:
        decision = None if score is None else score >= self.threshold
        self.writer.log(
            LogRow(
                rid,
                time.time(),
                entity,
                variant,
                role,
                mode,
                model.name,
                model.version,
                score,
                decision,
                latency_ms,
                status,
                error,
                features,
                forced,
            )
        )

    @staticmethod
    def _columns(features: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list]:
        if len(features) == 1:
            f = features[0]
            return {n: [f[n]] for n in names}
        return {n: [f[n] for f in features] for n in names}

    async def _await_group(self, group: _Group) -> None:
        try:
            probs = await group.future
        except ServingError as exc:
            group.error = exc
            return
        if not np.isfinite(probs).all():
            group.error = ModelFailed(
                f"model {group.model.name} v{group.model.version} returned non-finite scores"
            )
            log.error("%s", group.error)
            return
        group.probs = probs

    async def score(
        self,
        features: Sequence[Mapping[str, Any]],
        request_ids: Sequence[str],
        entity_keys: Sequence[str | None],
        forced: str | None,
        started: float,
        *,
        route_keys: Sequence[str] | None = None,
        split: bool = True,
        state: ServingState | None = None,
    ) -> tuple[list[tuple[str, LoadedModel, np.ndarray]], str]:
        """Route, score and log rows; per row (variant, model, probabilities) and the route mode.

        ``route_keys`` are what routing hashes in place of the request id (the caller's own
        ids, so a retried request is routed alike; default: ``request_ids``). ``split``
        routes every row on its own (``/predict``: rows are separate requests); otherwise
        the first row's keys route the whole batch (an OIP tensor is one request). Rows
        whose variant the caller forced are logged as ``forced``. Raises the failed group's
        ``ServingError`` (after logging every row). ``state`` is the serving state to use
        (default: the current one); rows hold the window features of its models.
        """
        state = self.state if state is None else state
        table = state.table
        mode = table.mode.value
        n = len(features)
        keys = request_ids if route_keys is None else route_keys
        if split:
            decisions = [route(table, entity_keys[i], keys[i], forced) for i in range(n)]
        else:
            decisions = [route(table, entity_keys[0], keys[0], forced)] * n
        groups: dict[str, _Group] = {}
        for i, d in enumerate(decisions):
            group = groups.get(d.variant)
            if group is None:
                model = state.slot(d.variant)
                if model is None:
                    raise NotReady(f"no model is loaded in the {d.variant} slot")
                group = groups[d.variant] = _Group(d.variant, model, [])
            group.index.append(i)
        deadline = time.monotonic() + self.timeout
        names = self.feature_names
        for group in groups.values():
            rows = [features[i] for i in group.index]
            group.model.acquire()
            columns = self._columns(rows, names + group.model.windows)
            group.future = group.model.worker.submit(columns, len(rows), deadline)
        try:
            for group in groups.values():
                await self._await_group(group)
        finally:
            for group in groups.values():
                group.model.release()
        elapsed = time.perf_counter() - started
        latency_ms = elapsed * 1e3
        out: list[tuple[str, LoadedModel, np.ndarray]] = [None] * n  # type: ignore[list-item]
        failure: ServingError | None = None
        for group in groups.values():
            model, variant, error = group.model, group.variant, group.error
            if error is not None:
                failure = failure or error
                self.metrics.failed(variant, PRIMARY, error.status, len(group.index))
                status, message = error.status, str(error)
            else:
                self.metrics.answered(variant, PRIMARY, elapsed, len(group.index))
                status, message = 200, None
            for j, i in enumerate(group.index):
                score = None
                if error is None:
                    probs = group.probs[j]
                    score = float(probs[1])
                    out[i] = (variant, model, probs)
                self._log(
                    request_ids[i],
                    entity_keys[i],
                    variant,
                    PRIMARY,
                    mode,
                    model,
                    score,
                    latency_ms,
                    status,
                    message,
                    features[i],
                    decisions[i].forced,
                )
        if failure is not None:
            raise failure
        mirrored = [i for i, d in enumerate(decisions) if d.mirror]
        if mirrored and state.candidate is not None:
            self._mirror(state.candidate, mirrored, features, request_ids, entity_keys, mode)
        return out, mode

    # ------------------------------------------------------------------ shadow

    def _mirror(
        self,
        model: LoadedModel,
        index: list[int],
        features: Sequence[Mapping[str, Any]],
        request_ids: Sequence[str],
        entity_keys: Sequence[str | None],
        mode: str,
    ) -> None:
        k = len(index)
        if self.shadow_pending + k > self.cfg.shadow_max_pending:
            self.metrics.shadow_skipped.inc(k)
            return
        rows = [features[i] for i in index]
        self.shadow_pending += k
        model.acquire()
        worker = model.mirror_worker(self.cfg.shadow_nice)
        columns = self._columns(rows, self.feature_names + model.windows)
        future = worker.submit(columns, k, time.monotonic() + self.timeout)
        keys = ([request_ids[i] for i in index], [entity_keys[i] for i in index], rows)
        future.add_done_callback(partial(self._shadow_done, model, keys, mode, time.perf_counter()))

    def _shadow_done(
        self,
        model: LoadedModel,
        keys: tuple[list, list, list],
        mode: str,
        started: float,
        future: asyncio.Future,
    ) -> None:
        model.release()
        rids, entities, rows = keys
        self.shadow_pending -= len(rids)
        elapsed = time.perf_counter() - started
        exc = future.exception()
        probs = None if exc is not None else future.result()
        if probs is not None and not np.isfinite(probs).all():
            exc, probs = ModelFailed(f"model {model.name} v{model.version} returned non-finite scores"), None
        if exc is not None:
            status = exc.status if isinstance(exc, ServingError) else 500
            self.metrics.failed(CANDIDATE, SHADOW, status, len(rids))
            for rid, ent, f in zip(rids, entities, rows, strict=True):
                self._log(rid, ent, CANDIDATE, SHADOW, mode, model, None, elapsed * 1e3, status, str(exc), f)
            return
        self.metrics.answered(CANDIDATE, SHADOW, elapsed, len(rids))
        for j, (rid, ent, f) in enumerate(zip(rids, entities, rows, strict=True)):
            self._log(
                rid, ent, CANDIDATE, SHADOW, mode, model, float(probs[j, 1]), elapsed * 1e3, 200, None, f
            )

    # ------------------------------------------------------------------ endpoints

    async def predict(self, records: list[Record], forced: str | None, started: float) -> dict[str, Any]:
        """``/predict``: each record routed on its own; score, decision and where it went.

        Every answer gets an id issued here (carrying the record's own ``request_id``, if
        any); labels for it are posted to ``/feedback`` under that id. Window features the
        serving models take and a record lacks are looked up for its entity first."""
        state = self.state
        await self._fill_records(records, state.models())
        issue = self.ids.issue
        rids = [issue(r.request_id) for r in records]
        answers, mode = await self.score(
            [r.features for r in records],
            rids,
            [r.entity_key for r in records],
            forced,
            started,
            route_keys=[r.request_id or rid for r, rid in zip(records, rids, strict=True)],
            state=state,
        )
        thr = self.threshold
        return {
            "predictions": [
                {
                    "request_id": rid,
                    "score": (s := float(p[1])),
                    "decision": s >= thr,
                    "variant": variant,
                    "model_name": model.name,
                    "model_version": model.version,
                }
                for rid, (variant, model, p) in zip(rids, answers, strict=True)
            ],
            "mode": mode,
        }

    async def _fill_records(self, records: Sequence[Record], models: Sequence[LoadedModel]) -> None:
        single = len(records) == 1
        await self._fill(
            [r.features for r in records],
            [r.entity for r in records],
            [r.ts_ns for r in records],
            models,
            lambda i: "features" if single else f"records[{i}].features",
        )

    async def _fill_v2(
        self, req: V2Request, rows: list[dict[str, Any]], models: Sequence[LoadedModel]
    ) -> None:
        n = req.rows
        await self._fill(
            rows,
            req.entities or (None,) * n,
            req.times_ns or (None,) * n,
            models,
            lambda j: f"inputs (row {j})",
        )

    async def _fill(
        self,
        rows: Sequence[dict[str, Any]],
        entities: Sequence[str | None],
        times_ns: Sequence[int | None],
        models: Sequence[LoadedModel],
        where: Callable[[int], str],
    ) -> None:
        """Look up the window features ``models`` take that rows lack (``OnlineFeatures.fill``),
        of each distinct feature view among them in one read, counted in metrics."""
        needed: dict[str, None] = {}
        views: list[FeatureSet] = []
        for m in models:
            if m.windows:
                needed |= dict.fromkeys(m.windows)
                if all(m.view is not v for v in views):
                    views.append(m.view)
        if not needed:
            return
        if self.online is None:  # a model takes window inputs only when they are declared
            raise NotReady("the served model takes window features but none are declared")
        started = time.perf_counter()
        try:
            looked_up = await self.online.fill(rows, entities, times_ns, tuple(needed), where, views)
        except FeaturesUnavailable:
            self.metrics.feature_lookups.labels("unavailable").inc(len(rows))
            raise
        if looked_up:
            self.metrics.feature_lookups.labels("ok").inc(looked_up)
            self.metrics.feature_lookup_latency.observe(time.perf_counter() - started)

    def _v2_rows(self, req: V2Request) -> tuple[list[dict[str, Any]], list[str]]:
        cols = req.columns
        names = self.feature_names + tuple(n for n in self.windows if n in cols)
        rows = [{n: cols[n][j] for n in names} for j in range(req.rows)]
        issue = self.ids.issue
        if req.rows == 1:
            return rows, [issue(req.id)]
        return rows, [issue(f"{req.id}:{j}" if req.id is not None else None) for j in range(req.rows)]

    def _v2_response(
        self, req: V2Request, model: LoadedModel, probs: np.ndarray, variant: str | None, rids: list[str]
    ) -> dict[str, Any]:
        out = {
            "model_name": model.name,
            "model_version": str(model.version),
            "outputs": [
                {
                    "name": PROBA_OUTPUT,
                    "datatype": "FP32",
                    "shape": [req.rows, 2],
                    "data": probs.ravel().tolist(),
                }
            ],
            "parameters": {"request_ids": rids, **({"variant": variant} if variant else {})},
        }
        if req.id is not None:
            out["id"] = req.id
        return out

    async def infer(self, req: V2Request, forced: str | None, started: float) -> dict[str, Any]:
        """OIP v2 infer on the model name: routed like ``/predict`` (the tensor is one request)."""
        state = self.state
        rows, rids = self._v2_rows(req)
        await self._fill_v2(req, rows, state.models())
        answers, _mode = await self.score(
            rows,
            rids,
            [req.entity_key] * req.rows,
            forced,
            started,
            route_keys=[req.id or rids[0]] * req.rows,
            split=False,
            state=state,
        )
        variant, model, _ = answers[0]
        probs = np.stack([a[2] for a in answers])
        return self._v2_response(req, model, probs, variant, rids)

    async def tenant_predict(
        self, tenant: str, name: str, records: list[Record], started: float
    ) -> dict[str, Any]:
        """Score ``records`` with ``tenant``'s model ``name`` (at the tenants' alias, loaded on
        demand), log them to the tenant's partition; its answers as ``/predict`` gives them.

        The caller has authenticated ``tenant`` and admitted the request under its quota.
        ``UnknownModel`` (404) for a name that is not the tenant's own, whoever owns it."""
        assert self.tenants is not None
        tenants = self.tenants
        tenants.check_owner(tenant, name)
        model = await tenants.model(name)
        await self._fill_records(records, (model,))
        issue = tenants.ids(tenant).issue
        rids = [issue(r.request_id) for r in records]
        features = [r.features for r in records]
        model.acquire()
        try:
            group = _Group(STABLE, model, list(range(len(records))))
            group.future = tenants.submit(
                tenant,
                model,
                self._columns(features, self.feature_names + model.windows),
                len(records),
                time.monotonic() + self.timeout,
            )
            await self._await_group(group)
        finally:
            model.release()
        elapsed = time.perf_counter() - started
        writer = tenants.writer(tenant)
        status = 200 if group.error is None else group.error.status
        for j, rid in enumerate(rids):
            score = None if group.probs is None else float(group.probs[j, 1])
            writer.log(
                LogRow(
                    rid,
                    time.time(),
                    records[j].entity_key,
                    STABLE,
                    PRIMARY,
                    Mode.SINGLE.value,
                    model.name,
                    model.version,
                    score,
                    None if score is None else score >= self.threshold,
                    elapsed * 1e3,
                    status,
                    None if group.error is None else str(group.error),
                    features[j],
                    False,
                )
            )
        if group.error is not None:
            raise group.error
        self.metrics.tenant_scored(tenant, elapsed)
        probs = group.probs
        return {
            "model_name": model.name,
            "predictions": [
                {
                    "request_id": rid,
                    "score": float(probs[j, 1]),
                    "decision": bool(probs[j, 1] >= self.threshold),
                    "version": model.version,
                }
                for j, rid in enumerate(rids)
            ],
        }

    async def model_for(self, version: int, *, load: bool) -> LoadedModel | None:
        """A loaded version (loading it on demand when ``load`` and configured so: the HTTP
        layer passes ``load`` only for admin-token holders)."""
        model = self.pool.get(version)
        if model is None and load and self.cfg.load_on_demand:
            model = await self.pool.load(version, required=False)
            self._export_pool()
        return model

    async def infer_version(
        self, version: int, req: V2Request, started: float, *, load: bool = False
    ) -> dict[str, Any]:
        """OIP v2 infer on one version, not routed (``load``: see ``model_for``). Logged, as
        ``forced`` (the caller chose the model), when that version is in a slot."""
        model = await self.model_for(version, load=load)
        if model is None:
            why = (
                "loading on demand needs the admin token"
                if self.cfg.load_on_demand
                else "loading on demand is off"
            )
            raise UnknownModel(f"version {version} of '{self.model_name}' is not loaded ({why})")
        state = self.state
        variant = STABLE if state.stable is model else CANDIDATE if state.candidate is model else None
        rows, rids = self._v2_rows(req)
        await self._fill_v2(req, rows, (model,))
        model.acquire()
        try:
            group = _Group(variant or STABLE, model, list(range(req.rows)))
            group.future = model.worker.submit(
                self._columns(rows, self.feature_names + model.windows),
                req.rows,
                time.monotonic() + self.timeout,
            )
            await self._await_group(group)
        finally:
            model.release()
        elapsed = time.perf_counter() - started
        if variant is not None:
            mode = state.table.mode.value
            status = 200 if group.error is None else group.error.status
            for j, rid in enumerate(rids):
                score = None if group.probs is None else float(group.probs[j, 1])
                self._log(
                    rid,
                    None,
                    variant,
                    PRIMARY,
                    mode,
                    model,
                    score,
                    elapsed * 1e3,
                    status,
                    None if group.error is None else str(group.error),
                    rows[j],
                    True,
                )
            if group.error is None:
                self.metrics.answered(variant, PRIMARY, elapsed, req.rows)
            else:
                self.metrics.failed(variant, PRIMARY, status, req.rows)
        if group.error is not None:
            raise group.error
        return self._v2_response(req, model, group.probs, variant, rids)

    def load_labels(self) -> int:
        """Bring the first-label index up to date with the feedback logs (blocking: called once
        at start), so a label sent again after a restart is still refused; rows read."""
        store = PredictionLogStore.for_settings(self.settings)
        n = self.first_labels.catch_up(MAIN_LABELS, lambda since: store.read_feedback(since))
        if self.tenants is not None:
            n += self.tenants.catch_up_labels()
        return n

    def feedback(self, items: list[tuple[str, int]]) -> dict[str, Any]:
        """Record labels, all or none: every request id must be one this service issued, and a
        request keeps its first label. A label equal to the one already recorded is a no-op
        (a retried batch succeeds); ``{"accepted": new labels, "unchanged": repeats}``.

        Raises ``UnknownRequest`` (422) for an id the service did not issue,
        ``LabelConflict`` (409) for a label that differs from the first one, and
        ``Overloaded`` (503) when the buffer cannot take them; nothing is recorded then.
        """
        return self._record_labels(items, self.ids, MAIN_LABELS, self.writer)

    def tenant_feedback(self, tenant: str, items: list[tuple[str, int]]) -> dict[str, Any]:
        """``/feedback`` for one tenant: labels only for request ids its own requests were
        given (another tenant's or the main model's ids are refused, 422), recorded in the
        tenant's prediction-log partition."""
        assert self.tenants is not None
        t = self.tenants
        return self._record_labels(items, t.ids(tenant), tenant_scope(tenant), t.writer(tenant))

    def _record_labels(
        self,
        items: list[tuple[str, int]],
        ids: RequestIds,
        scope: str,
        writer: PredictionLogWriter,
    ) -> dict[str, Any]:
        forged = [rid for rid, _ in items if not ids.verify(rid)]
        if forged:
            raise UnknownRequest(
                f"{len(forged)} of {len(items)} labels name a request id this service did not issue "
                f"(first: {forged[0][:80]!r}); nothing was recorded"
            )
        known = self.first_labels.known(scope, (rid for rid, _ in items))
        new: dict[str, int] = {}
        conflicts = []
        for rid, label in items:
            first = known.get(rid, new.get(rid))
            if first is None:
                new[rid] = label
            elif first != label:
                conflicts.append((rid, first, label))
        if conflicts:
            rid, first, label = conflicts[0]
            raise LabelConflict(
                f"{len(conflicts)} of {len(items)} labels conflict with the first label of their request, "
                f"which is kept (first: {rid[:80]!r} has {first}, got {label}); nothing was recorded"
            )
        if not writer.feedback(list(new.items()), time.time()):
            raise Overloaded("the feedback buffer is full; nothing was recorded, retry later")
        self.first_labels.accept(scope, new)
        self.metrics.feedback.inc(len(new))
        return {"accepted": len(new), "unchanged": len(items) - len(new)}

    def admit(self) -> None:
        """Count a scoring request in, or shed it at once when at capacity."""
        if self.inflight >= self.cfg.max_inflight_requests:
            raise Overloaded(
                f"overloaded: {self.inflight} requests in flight (limit {self.cfg.max_inflight_requests}); retry later"
            )
        self.inflight += 1

    def done(self) -> None:
        """Count a request admitted by ``admit`` out again."""
        self.inflight -= 1

    # ------------------------------------------------------------------ admin

    def _check_slots(self, table: RouteTable, candidate: LoadedModel | int | None) -> None:
        if table.mode in NEEDS_CANDIDATE and candidate is None:
            raise Conflict(f"{table.mode.value} routing needs a model in the candidate slot; load one first")

    async def apply(self, desired: DesiredState, key: str | None = None) -> dict[str, Any]:
        """Make ``desired`` the serving state (loading versions as needed); the applied state.

        Runs to completion even if the calling request is cancelled, so a timed-out admin
        call never leaves a half-applied change; repeating it is a no-op.
        """
        return await asyncio.shield(asyncio.ensure_future(self._apply(desired, key)))

    async def _apply(self, desired: DesiredState, key: str | None) -> dict[str, Any]:
        assert self._admin_lock is not None, "start() was not called"
        async with self._admin_lock:
            try:
                table = desired.table()
            except InvalidRouteTable as exc:
                raise InvalidRequest(str(exc)) from None
            self._check_slots(table, desired.candidate_version)
            current = self.state
            if desired == current.desired():
                return self.describe(changed=False)
            wanted = {v for v in (desired.stable_version, desired.candidate_version) if v is not None}
            self.pool.pin(current.versions() | wanted)  # nothing needed now or next is evicted meanwhile
            try:
                stable = await self.pool.load(desired.stable_version, required=True)
                candidate = None
                if desired.candidate_version is not None:
                    candidate = await self.pool.load(desired.candidate_version, required=True)
                # Persist first, then swap: a state that cannot be saved is not applied, so
                # memory and disk never disagree (a retry re-applies, a restart restores it).
                generation = current.generation + 1
                try:
                    await asyncio.to_thread(
                        save_state, self.state_file, self.model_name, desired, generation, key
                    )
                except OSError as exc:
                    raise StateNotSaved(
                        f"cannot persist the serving state to {self.state_file} ({exc.strerror or exc}); "
                        f"still serving generation {current.generation}: {self.describe_routes()}"
                    ) from exc
            except BaseException:
                self.pool.pin(self.state.versions())
                raise
            self.state = ServingState(table, stable, candidate, generation, time.time(), key)
            self.pool.pin(self.state.versions())
            self._export_state()
            log.info("serving state %d applied: %s", self.state.generation, self.describe_routes())
            return self.describe(changed=True)

    def _current(self, what: str) -> DesiredState:
        desired = self.state.desired()
        if desired is None:
            raise Conflict(
                f"nothing is loaded in the stable slot yet; {what} needs a full state (PUT /admin/state)"
            )
        return desired

    async def set_slot(
        self, slot: str, version: int | None, alias: str | None, key: str | None
    ) -> dict[str, Any]:
        """Load ``version`` (or the version ``alias`` points at) into ``slot``, routes unchanged;
        no version and no alias empties the candidate slot."""
        if version is not None and alias is not None:
            raise InvalidRequest("give either version or alias, not both")
        if alias is not None:
            version = await asyncio.to_thread(self.source.resolve, alias)
            if version is None:
                raise UnknownModel(f"model '{self.model_name}' has no alias '{alias}'")
        if slot == STABLE:
            if version is None:
                raise Conflict("the stable slot cannot be emptied")
            base = self.state.desired()
            desired = (
                base.model_copy(update={"stable_version": version})
                if base is not None
                else DesiredState(stable_version=version)
            )
        else:
            desired = self._current("loading the candidate").model_copy(update={"candidate_version": version})
        return await self.apply(DesiredState.model_validate(desired.model_dump()), key)

    async def set_routes(self, routes: RoutesSpec, key: str | None) -> dict[str, Any]:
        """Replace the routes, slots unchanged; the applied state."""
        base = self._current("changing routes")
        return await self.apply(
            DesiredState(
                **routes.model_dump(),
                stable_version=base.stable_version,
                candidate_version=base.candidate_version,
            ),
            key,
        )

    async def flip(self, key: str | None) -> dict[str, Any]:
        """Swap the active slot of blue_green routing; the applied state."""
        base = self._current("a flip")
        if base.mode != Mode.BLUE_GREEN.value:
            raise Conflict(f"only blue_green routing flips; the mode is {base.mode}")
        other = CANDIDATE if base.active_slot == STABLE else STABLE
        return await self.apply(base.model_copy(update={"active_slot": other}), key)

    async def preload(self, version: int) -> dict[str, Any]:
        """Load ``version`` into the pool without giving it a slot; the applied state."""
        await self.pool.load(version, required=True)
        self._export_pool()
        return self.describe(changed=False)

    # ------------------------------------------------------------------ describing

    def describe_routes(self) -> str:
        """The routes and slots in one line, e.g. ``canary 10% (stable=v1, candidate=v2)``."""
        s = self.state
        slots = ", ".join(
            f"{name}=v{m.version}" if m else f"{name}=-"
            for name, m in (("stable", s.stable), ("candidate", s.candidate))
        )
        t = s.table
        detail = {
            Mode.CANARY: f" {t.weight_pct:g}%",
            Mode.AB: f" {t.weight_pct:g}%",
            Mode.SHADOW: f" {t.mirror_pct:g}% mirrored",
            Mode.BLUE_GREEN: f" active={t.active_slot}",
        }.get(t.mode, "")
        return f"{t.mode.value}{detail} ({slots})"

    def describe(self, *, changed: bool | None = None) -> dict[str, Any]:
        """The applied state: the ``DesiredState`` fields plus slots, pool and bookkeeping."""
        s = self.state
        routes = RoutesSpec.of(s.table).model_dump()
        slot = {
            name: (
                None
                if m is None
                else {"version": m.version, "loaded_at": datetime.fromtimestamp(m.loaded_at, UTC).isoformat()}
            )
            for name, m in (("stable", s.stable), ("candidate", s.candidate))
        }
        out: dict[str, Any] = {
            "model_name": self.model_name,
            **routes,
            "stable_version": s.stable.version if s.stable else None,
            "candidate_version": s.candidate.version if s.candidate else None,
            "generation": s.generation,
            "applied_at": datetime.fromtimestamp(s.applied_at, UTC).isoformat() if s.applied_at else None,
            "applied_key": s.applied_key,
            "ready": self.ready,
            "slots": slot,
            "pool": {
                "budget_bytes": self.pool.budget_bytes,
                "used_bytes": self.pool.used_bytes,
                "evictions": self.pool.evictions,
                "models": [m.describe() for m in self.pool.models],
            },
        }
        if changed is not None:
            out["changed"] = changed
        return out

    def _export_state(self) -> None:
        s = self.state
        m = self.metrics
        m.slot_version.labels(STABLE).set(s.stable.version if s.stable else 0)
        m.slot_version.labels(CANDIDATE).set(s.candidate.version if s.candidate else 0)
        t = s.table
        pct = {
            Mode.CANARY: t.weight_pct,
            Mode.AB: t.weight_pct,
            Mode.SHADOW: t.mirror_pct,
            Mode.BLUE_GREEN: 100.0 if t.active_slot == CANDIDATE else 0.0,
        }.get(t.mode, 0.0)
        m.candidate_pct.set(pct)
        self._export_pool()

    def _export_pool(self) -> None:
        m = self.metrics
        m.models_loaded.set(len(self.pool.models))
        m.model_bytes.set(self.pool.used_bytes)
        m.evictions.set(self.pool.evictions)

    def render_metrics(self) -> bytes:
        """Refresh the gauges and render every metric in the Prometheus text format."""
        m = self.metrics
        m.inflight.set(self.inflight)
        m.log_buffered.set(self.writer.buffered)
        m.log_dropped.set(self.writer.dropped)
        self._export_pool()
        if self.tenants is not None:
            m.tenant_models_loaded.set(len(self.tenants.pool.models))
        return m.render()

    # ------------------------------------------------------------------ idempotency

    def remembered(self, key: str, fingerprint: str) -> tuple[int, dict[str, Any]] | None:
        """The stored answer to an admin call with this Idempotency-Key, if it was made."""
        hit = self.idempotency.get(key)
        if hit is None:
            return None
        if hit[0] != fingerprint:
            raise InvalidRequest(f"Idempotency-Key {key!r} was already used for a different request")
        return hit[1], hit[2]

    def remember(self, key: str, fingerprint: str, status: int, body: dict[str, Any]) -> None:
        """Store the answer to an admin call under its Idempotency-Key, oldest keys dropped past the limit."""
        self.idempotency[key] = (fingerprint, status, body)
        while len(self.idempotency) > self.cfg.idempotency_keys:
            self.idempotency.popitem(last=False)
