"""Traffic simulator for rollout demos and tests: pure, seeded, clock-free.

``TrafficSimulator`` is the client side: it generates requests (card transactions from
``mlops.datagen``, sticky user ids from a skewed population, Poisson arrivals at
``rate_per_s``) and their delayed labels, and never sleeps or sends; a driver loop owns the
clock and the IO::

    sim = TrafficSimulator(config, start=t0)
    for t, batch, labels in sim.stream(until=t0 + duration, step_s=1.0):
        sleep_until(t)                             # the driver's clock (or none: virtual time)
        responses = send(batch.payloads())         # the driver's HTTP calls (or SimulatedService)
        sim.record(responses)                      # optional: client-side tally
        post_feedback(labels)                      # request_id, label, ts

``SimulatedService`` stands in for the serving layer: it routes each request with
``mlops.routing`` and answers with simulated models (``SimulatedModel``), returning
prediction-log rows. ``Pathology`` describes a bad candidate (less accurate, drifted,
slower, erroring); ``Pathology.perturb`` applies it to a real model's answers. The model of
simulated scores: docs/design/rollout-model.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from hashlib import blake2b
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from mlops.datagen import fraud_schema, generate
from mlops.predlog import FEATURE_PREFIX, PRIMARY, SHADOW
from mlops.rollout.observe import Reference
from mlops.routing import CANDIDATE, STABLE, Mode, RouteTable, route
from mlops.settings import DatasetSchema, StrictModel

_LATENTS = ("_z", "_e_stable", "_e_candidate", "_u_error", "_l_stable", "_l_candidate")


class SimulatedModel(StrictModel):
    """How one simulated model scores: quality, calibration prior, latency, threshold."""

    separation: float = Field(2.5, gt=0)
    noise: float = Field(1.0, gt=0)
    base_rate: float = Field(0.011, gt=0, lt=1)
    latency_ms: float = Field(6.0, gt=0)
    latency_spread: float = Field(0.3, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)

    @property
    def auc(self) -> float:
        """The model's ROC AUC: ``Phi(separation / (noise * sqrt(2)))``."""
        return 0.5 * (1.0 + math.erf(self.separation / (2.0 * self.noise)))


class Pathology(StrictModel):
    """What is wrong with a candidate (all neutral by default)."""

    extra_noise: float = Field(0.0, ge=0)  # less accurate: noise grows to sqrt(noise^2 + extra^2)
    score_shift: float = 0.0  # drifted: logit shift added to every score
    latency_factor: float = Field(1.0, gt=0)  # slower: latency multiplied
    extra_latency_ms: float = Field(0.0, ge=0)
    error_share: float = Field(0.0, ge=0, le=1)  # erroring: share of inputs answered with an error

    def apply(self, model: SimulatedModel) -> SimulatedModel:
        """The model as its quality pathologies make it (latency and errors apply per request)."""
        return model.model_copy(update={"noise": math.hypot(model.noise, self.extra_noise)})

    def perturb(
        self,
        scores: np.ndarray,
        keys: Sequence[str],
        latency_ms: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What this pathology does to a real model's answers, for a fault-injecting wrapper
        around a served candidate: the perturbed scores (logit noise and shift), the delay
        to add to each answer (ms) and which answers fail. Deterministic per input ``key``
        (e.g. the features hash), so an input fails or is perturbed the same way every time.
        """
        n = len(keys)
        digests = np.array(
            [int.from_bytes(blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
            dtype=np.uint64,
        ).reshape(n)
        u1 = ((digests >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
        u2 = ((digests & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller from the key
        p = np.clip(np.asarray(scores, dtype=np.float64), 1e-9, 1 - 1e-9)
        logit = np.log(p / (1 - p)) + self.extra_noise * z + self.score_shift
        delay = np.asarray(latency_ms, dtype=np.float64) * (self.latency_factor - 1.0) + self.extra_latency_ms
        return 1.0 / (1.0 + np.exp(-logit)), np.maximum(delay, 0.0), u1 < self.error_share


PATHOLOGIES: Mapping[str, Pathology] = {
    "none": Pathology(),
    "less_accurate": Pathology(extra_noise=2.0),
    "slower": Pathology(latency_factor=3.0),
    "erroring": Pathology(error_share=0.05),
    "drifted": Pathology(score_shift=1.5),
}
"""The named pathologies the demo offers."""


class SimulatorConfig(StrictModel):
    """Traffic and models of one simulation."""

    seed: int = 0
    rate_per_s: float = Field(200.0, gt=0)
    users: int = Field(2000, ge=1)
    user_skew: float = Field(0.5, ge=0)  # popularity ~ 1 / rank^skew (0.5: the busiest user ~1 % of traffic)
    label_delay_s: float = Field(5.0, ge=0)  # mean of an exponential delay
    label_share: float = Field(1.0, ge=0, le=1)
    input_drift: float = Field(0.0, ge=0, le=1)  # datagen drift of the traffic's features
    correlation: float = Field(0.9, ge=0, le=1)  # rho: shared part of two models' errors
    stable: SimulatedModel = SimulatedModel()
    candidate: SimulatedModel = SimulatedModel()
    pathology: Pathology = Pathology()


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class RequestBatch:
    """Requests generated for one interval, as columns: ``request_id``, ``ts`` (UTC),
    ``entity_key``, one column per feature, the true ``label`` (never sent) and the latent
    draws the simulated models use (names starting with ``_``)."""

    columns: Mapping[str, Any]
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.columns["request_id"])

    def take(self, index: np.ndarray) -> RequestBatch:
        """The requests at positions ``index``."""
        return RequestBatch({k: v[index] for k, v in self.columns.items()}, self.feature_names)

    @property
    def frame(self) -> pd.DataFrame:
        """The batch as a data frame, one row per request."""
        return pd.DataFrame(dict(self.columns))

    def payloads(self) -> Iterator[dict[str, object]]:
        """What a driver sends: ``request_id``, ``entity_key``, ``ts`` and ``features``."""
        cols = self.columns
        feats = pd.DataFrame({n: cols[n] for n in self.feature_names}).to_dict("records")
        for rid, ent, ts, f in zip(cols["request_id"], cols["entity_key"], cols["ts"], feats, strict=True):
            yield {"request_id": rid, "entity_key": ent, "ts": ts.isoformat(), "features": f}


class TrafficSimulator:
    """Seeded generator of requests and their delayed labels (see the module docstring)."""

    def __init__(self, config: SimulatorConfig, start: datetime, schema: DatasetSchema | None = None) -> None:
        self.config = config
        self.schema = schema or fraud_schema()
        self.clock = pd.Timestamp(start)
        self._batch = 0
        self._issued = 0
        self._rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
        ranks = np.arange(1, config.users + 1, dtype=np.float64)
        weights = ranks**-config.user_skew
        self._user_p = weights / weights.sum()
        self._pending: tuple[np.ndarray, np.ndarray, pd.DatetimeIndex] | None = None
        self.tally: dict[tuple[str, int], int] = {}

    def requests_until(self, until: datetime) -> RequestBatch:
        """Requests arriving in ``[clock, until)``; advances the clock to ``until``."""
        end = pd.Timestamp(until)
        span = (end - self.clock).total_seconds()
        if span < 0:
            raise ValueError("the simulator's clock only moves forward")
        cfg, rng = self.config, self._rng
        n = int(rng.poisson(cfg.rate_per_s * span))
        frame = generate(max(n, 1), seed=cfg.seed * 1_000_003 + self._batch, drift=cfg.input_drift).head(n)
        self._batch += 1
        ts = self.clock + pd.to_timedelta(np.sort(rng.uniform(0.0, span, n)), unit="s")
        users = rng.choice(cfg.users, size=n, p=self._user_p)
        ids = np.array([f"req-{cfg.seed}-{i}" for i in range(self._issued, self._issued + n)], dtype=object)
        features = frame[list(self.schema.feature_names)]
        columns: dict[str, Any] = {
            "request_id": ids,
            "ts": ts,
            "entity_key": np.char.add("user-", users.astype(str)).astype(object),
            "label": frame[self.schema.label_column].to_numpy(dtype=np.int64),
            # features_hash of the log: over the numeric features (enough to tell requests apart)
            "_hash": pd.util.hash_pandas_object(features[list(self.schema.numeric_names)], index=False)
            .map("{:016x}".format)
            .to_numpy(dtype=object),
        }
        columns.update({name: features[name].to_numpy() for name in self.schema.feature_names})
        columns.update(
            {c: rng.uniform(size=n) if c.startswith("_u") else rng.standard_normal(n) for c in _LATENTS}
        )
        self._issued += n
        self.clock = end
        delays = rng.exponential(cfg.label_delay_s, n) if cfg.label_delay_s > 0 else np.zeros(n)
        keep = rng.uniform(size=n) < cfg.label_share
        due = (ts + pd.to_timedelta(delays, unit="s"))[keep]
        new = (ids[keep], columns["label"][keep], due)
        if self._pending is not None:
            old = self._pending
            new = (np.concatenate([old[0], new[0]]), np.concatenate([old[1], new[1]]), old[2].append(new[2]))
        self._pending = new
        return RequestBatch(columns, self.schema.feature_names)

    def labels_until(self, until: datetime) -> pd.DataFrame:
        """Labels that arrive by ``until`` and were not returned before: feedback rows
        ``request_id``, ``label``, ``ts`` in arrival order."""
        ids, labels, ts = self._pending or (
            np.empty(0, dtype=object),
            np.empty(0, dtype=np.int64),
            pd.DatetimeIndex([], tz="UTC"),
        )
        due = np.asarray(ts <= pd.Timestamp(until))
        self._pending = (ids[~due], labels[~due], ts[~due])
        order = np.argsort(np.asarray(ts[due]), kind="stable")
        return pd.DataFrame(
            {"request_id": ids[due][order], "label": labels[due][order], "ts": ts[due][order]}
        )

    def stream(
        self, until: datetime, step_s: float
    ) -> Iterator[tuple[pd.Timestamp, RequestBatch, pd.DataFrame]]:
        """``(t, requests arriving before t, labels arriving by t)`` every ``step_s`` up to
        ``until``: a driver sends each batch (pacing itself to ``t`` in real time, if it
        runs against a live service) and posts the labels."""
        end = pd.Timestamp(until)
        while self.clock < end:
            t = min(self.clock + pd.Timedelta(seconds=step_s), end)
            yield t, self.requests_until(t), self.labels_until(t)

    def record(self, responses: Iterable[Mapping[str, object]] | pd.DataFrame) -> None:
        """Count answers per ``(variant, status)`` as the client saw them."""
        if isinstance(responses, pd.DataFrame):
            counts = responses.groupby(["variant", "status"]).size()
            pairs: Iterable[tuple[tuple[str, int], int]] = (
                ((str(v), int(st)), int(n)) for (v, st), n in counts.items()
            )
        else:
            pairs = (((str(r.get("variant")), int(r.get("status", 200))), 1) for r in responses)  # type: ignore[arg-type]
        for key, n in pairs:
            self.tally[key] = self.tally.get(key, 0) + n


# --------------------------------------------------------------------------- service stand-in


def _scores(
    model: SimulatedModel, label: np.ndarray, z: np.ndarray, e: np.ndarray, rho: float, shift: float
) -> np.ndarray:
    d, s = model.separation, model.noise
    r = d * label + s * (rho * z + math.sqrt(1.0 - rho * rho) * e)
    prior = math.log(model.base_rate / (1.0 - model.base_rate))
    logit = prior + d / (s * s) * (r - d / 2.0) + shift
    return 1.0 / (1.0 + np.exp(-logit))


class SimulatedService:
    """In-process serving stand-in: routes, answers and logs like the real service would.

    ``apply`` takes what a route effect carries (a ``RouteTable`` and the version each slot
    serves); the stable version answers with ``config.stable``, the candidate version with
    ``config.candidate`` under ``config.pathology``.
    """

    def __init__(
        self, config: SimulatorConfig, *, model_name: str, stable_version: int, candidate_version: int
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.versions = {STABLE: stable_version, CANDIDATE: candidate_version}
        self.behaviour = {
            stable_version: (config.stable, Pathology(), STABLE),
            candidate_version: (config.pathology.apply(config.candidate), config.pathology, CANDIDATE),
        }
        self.table = RouteTable()
        self.changes = 0

    def apply(self, table: RouteTable, stable_version: int, candidate_version: int | None) -> None:
        """Swap in new routes and slot versions (counted in ``changes`` when anything differs)."""
        versions = {STABLE: stable_version, CANDIDATE: candidate_version}
        if table != self.table or versions != self.versions:
            self.changes += 1
        self.table, self.versions = table, versions  # type: ignore[assignment]

    def _answer(self, rows: RequestBatch, slot: str, role: str, mode: str) -> dict[str, Any]:
        version = self.versions[slot]
        if version is None:
            raise ValueError(f"the {slot} slot is empty")
        model, patho, draws = self.behaviour[version]  # a model keeps its own draws in either slot
        c = rows.columns
        n = len(rows)
        score = _scores(
            model, c["label"], c["_z"], c[f"_e_{draws}"], self.config.correlation, patho.score_shift
        )
        latency = model.latency_ms * np.exp(model.latency_spread * c[f"_l_{draws}"]) * patho.latency_factor
        failed = c["_u_error"] < patho.error_share
        decision = np.where(failed, None, score >= model.threshold)
        out: dict[str, Any] = {
            "request_id": c["request_id"],
            "ts": c["ts"],
            "entity_key": c["entity_key"],
            "variant": np.full(n, slot, dtype=object),
            "role": np.full(n, role, dtype=object),
            "mode": np.full(n, mode, dtype=object),
            "model_name": np.full(n, self.model_name, dtype=object),
            "model_version": np.full(n, version, dtype=np.int64),
            "score": np.where(failed, np.nan, score),
            "decision": decision,
            "latency_ms": latency + patho.extra_latency_ms,
            "status": np.where(failed, 500, 200).astype(np.int32),
            "error": np.where(failed, "simulated model failure", None).astype(object),
            "features_hash": c["_hash"],
        }
        out.update({FEATURE_PREFIX + name: c[name] for name in rows.feature_names})
        return out

    def handle(self, batch: RequestBatch) -> pd.DataFrame:
        """Prediction-log rows for a batch: one primary answer per request, plus a shadow
        answer for each mirrored request, in arrival order."""
        table = self.table
        n = len(batch)
        if table.mode in (Mode.SINGLE, Mode.BLUE_GREEN):
            slot = table.active_slot if table.mode is Mode.BLUE_GREEN else STABLE
            variant = np.full(n, slot, dtype=object)
            mirror = np.zeros(n, dtype=bool)
        else:
            cols = batch.columns
            decisions = [
                route(table, e, r) for e, r in zip(cols["entity_key"], cols["request_id"], strict=True)
            ]
            variant = np.array([d.variant for d in decisions], dtype=object).reshape(n)
            mirror = np.array([d.mirror for d in decisions], dtype=bool).reshape(n)
        mode = table.mode.value
        parts = [
            self._answer(batch.take(np.flatnonzero(variant == v)), v, PRIMARY, mode)
            for v in (STABLE, CANDIDATE)
        ]
        parts.append(
            self._answer(batch.take(np.flatnonzero(mirror)), CANDIDATE, SHADOW, mode) if mirror.any() else {}
        )
        parts = [p for p in parts if p and len(p["request_id"])] or parts[:1]
        merged = {
            k: (
                parts[0][k].append([p[k] for p in parts[1:]])
                if isinstance(parts[0][k], pd.Index)
                else np.concatenate([p[k] for p in parts])
            )
            for k in parts[0]
        }
        order = np.argsort(np.asarray(merged["ts"]), kind="stable")
        frame = pd.DataFrame({k: v[order] for k, v in merged.items()})
        frame["decision"] = frame["decision"].astype("boolean")
        return frame

    def replay(self, batch: RequestBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Both slots' scores on the same rows, and the labels (the offline comparison)."""
        s = self._answer(batch, STABLE, PRIMARY, "single")["score"]
        c = self._answer(batch, CANDIDATE, PRIMARY, "single")["score"]
        return s, c, batch.columns["label"].astype(np.float64)

    def references(self, batch: RequestBatch) -> dict[str, Reference]:
        """Training-time references on ``batch`` (generated without drift): each model's
        scores as it was trained (a less accurate model is so in training too, a drift shift
        is not) and the batch's features."""
        c = batch.columns
        frame = batch.frame
        schema = fraud_schema()
        out = {}
        for slot, model in (
            (STABLE, self.config.stable),
            (CANDIDATE, self.config.pathology.apply(self.config.candidate)),
        ):
            scores = _scores(model, c["label"], c["_z"], c[f"_e_{slot}"], self.config.correlation, 0.0)
            out[slot] = Reference.build(scores, frame, schema.numeric_names, schema.categorical_names)
        return out


def run_window(
    sim: TrafficSimulator, service: SimulatedService, seconds: float, step_s: float = 1.0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drive ``service`` with ``sim`` for ``seconds`` from the simulator's clock: the log
    rows and the labels that arrived meanwhile."""
    logs, labels = [], []
    for _, batch, arrived in sim.stream(sim.clock + pd.Timedelta(seconds=seconds), step_s):
        rows = service.handle(batch)
        sim.record(rows[rows["role"] == PRIMARY])
        logs.append(rows)
        labels.append(arrived)
    return pd.concat(logs, ignore_index=True), pd.concat(labels, ignore_index=True)
