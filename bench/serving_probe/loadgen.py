"""Closed-loop load generators that record every latency.

Two async clients (c connections, keep-alive, each sending its next request as soon as the
previous response is read) and a sequential one (c=1):

* ``raw``: asyncio streams with a pre-built request, minimal HTTP/1.1 parsing. Costs the
  machine little CPU, so on a 2-core box it steals less from the server under test.
* ``aiohttp``: a real client library, heavier per request.

Every latency is kept (perf_counter_ns), so p50/p99/max are exact and each stall (a
latency above ``stall_ms``) is reported with its time offset in the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    name: str
    duration_s: float
    latencies_ns: np.ndarray
    errors: int = 0
    stall_ms: float = 50.0
    stall_offsets_s: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(self.latencies_ns.size)

    @property
    def rps(self) -> float:
        return self.count / self.duration_s

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ns, q) / 1e6) if self.count else float("nan")

    @property
    def max_ms(self) -> float:
        return float(self.latencies_ns.max() / 1e6) if self.count else float("nan")

    @property
    def stalls(self) -> int:
        return int((self.latencies_ns > self.stall_ms * 1e6).sum())

    def summary(self) -> dict:
        return {
            "name": self.name,
            "requests": self.count,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.pct_ms(50), 3),
            "p99_ms": round(self.pct_ms(99), 3),
            "p999_ms": round(self.pct_ms(99.9), 3),
            "max_ms": round(self.max_ms, 2),
            "stalls": self.stalls,
        }

    def line(self) -> str:
        s = self.summary()
        return (
            f"{s['name']:28s} {s['rps']:9.1f} rps  p50 {s['p50_ms']:7.3f}  p99 {s['p99_ms']:7.3f}"
            f"  p99.9 {s['p999_ms']:8.3f}  max {s['max_ms']:8.2f} ms  stalls>{self.stall_ms:g}ms "
            f"{s['stalls']:4d}  err {s['errors']}"
        )


def build_request(host: str, port: int, path: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value)
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        await reader.readexactly(length)
    elif chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _raw_worker(host, port, request, deadline_ns, lat, offsets, t0, errors):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter_ns() < deadline_ns:
            start = time.perf_counter_ns()
            writer.write(request)
            try:
                status = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                errors[0] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            end = time.perf_counter_ns()
            if status != 200:
                errors[0] += 1
            lat.append(end - start)
            offsets.append(start - t0)
    finally:
        writer.close()


async def _aiohttp_worker(session, url, body, deadline_ns, lat, offsets, t0, errors):
    headers = {"Content-Type": "application/json"}
    while time.perf_counter_ns() < deadline_ns:
        start = time.perf_counter_ns()
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            status = resp.status
        end = time.perf_counter_ns()
        if status != 200:
            errors[0] += 1
        lat.append(end - start)
        offsets.append(start - t0)


async def run_async(
    host: str,
    port: int,
    path: str,
    payload: dict,
    *,
    concurrency: int,
    duration_s: float,
    client: str = "raw",
    warmup_s: float = 1.0,
    stall_ms: float = 50.0,
    name: str | None = None,
) -> Result:
    """Drive the server with ``concurrency`` keep-alive connections for ``duration_s``."""
    if warmup_s > 0:
        await run_async(
            host, port, path, payload, concurrency=concurrency, duration_s=warmup_s, client=client, warmup_s=0
        )
    lat: list[int] = []
    offsets: list[int] = []
    errors = [0]
    t0 = time.perf_counter_ns()
    deadline = t0 + int(duration_s * 1e9)
    if client == "raw":
        request = build_request(host, port, path, payload)
        await asyncio.gather(
            *(
                _raw_worker(host, port, request, deadline, lat, offsets, t0, errors)
                for _ in range(concurrency)
            )
        )
    elif client == "aiohttp":
        import aiohttp

        body = json.dumps(payload).encode()
        conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        async with aiohttp.ClientSession(connector=conn) as session:
            url = f"http://{host}:{port}{path}"
            await asyncio.gather(
                *(
                    _aiohttp_worker(session, url, body, deadline, lat, offsets, t0, errors)
                    for _ in range(concurrency)
                )
            )
    else:
        raise ValueError(f"unknown client {client!r}")
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    arr = np.asarray(lat, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64)
    stall_offsets = (offs[arr > stall_ms * 1e6] / 1e9).round(3).tolist()
    return Result(name or f"{client} c={concurrency}", elapsed, arr, errors[0], stall_ms, stall_offsets)


def run_sync(
    host: str,
    port: int,
    path: str,
    payload: dict,
    *,
    duration_s: float,
    stall_ms: float = 50.0,
    name: str = "sequential c=1",
) -> Result:
    """One blocking keep-alive connection (http.client), one request after another."""
    import http.client

    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection(host, port)
    for _ in range(50):
        conn.request("POST", path, body, headers)
        conn.getresponse().read()
    lat: list[int] = []
    offsets: list[int] = []
    errors = 0
    t0 = time.perf_counter_ns()
    deadline = t0 + int(duration_s * 1e9)
    while time.perf_counter_ns() < deadline:
        start = time.perf_counter_ns()
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        resp.read()
        end = time.perf_counter_ns()
        errors += resp.status != 200
        lat.append(end - start)
        offsets.append(start - t0)
    conn.close()
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    arr = np.asarray(lat, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64)
    return Result(name, elapsed, arr, errors, stall_ms, (offs[arr > stall_ms * 1e6] / 1e9).round(3).tolist())
