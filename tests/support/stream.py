"""A stream consumer as the tests build it, and a consumer process that is SIGKILLed at random
moments and restarted until it finishes (exactly-once tests and bench/stream.py)."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from adapters.broker import SqliteBroker
from adapters.feature_store import EmbeddedFeatureStore
from mlops.features import FeatureSet
from mlops.onnx_model import OnnxScorer
from mlops.routing import RouteTable
from mlops.scoring import ModelRef
from tasks.stream import StreamConsumer

REPO = Path(__file__).resolve().parents[2]
FEATURES_YAML = REPO / "configs" / "features.yaml"


def stream_consumer(
    schema,
    fs: FeatureSet,
    onnx: bytes,
    home: Path,
    broker,
    group: str = "scorer",
    checkpoint_every: int = 1,
    candidate: bytes | None = None,
    routes: RouteTable | None = None,
) -> StreamConsumer:
    """A consumer of topic ``tx`` scoring with ``onnx`` (version 1, threshold 0.2), its feature
    state under ``home/state/<group>`` and its output parts under ``home/out/<group>``; with
    ``candidate`` (version 2, threshold 0.3) routed by ``routes``."""
    cand = (
        (OnnxScorer(candidate, schema), ModelRef("fraud-detector", 2, "challenger", 0.3, _digest(candidate)))
        if candidate is not None
        else None
    )
    return StreamConsumer(
        broker=broker,
        store=EmbeddedFeatureStore(home / "state" / group, fs),
        fs=fs,
        schema=schema,
        scorer=OnnxScorer(onnx, schema),
        model=ModelRef("fraud-detector", 1, "champion", 0.2, _digest(onnx)),
        out_dir=home / "out" / group,
        topic="tx",
        group=group,
        checkpoint_every=checkpoint_every,
        routes=routes,
        candidate=cand,
    )


def _digest(onnx: bytes) -> str:
    return hashlib.sha256(onnx).hexdigest()[:16]


def child_broker(home: Path, where: str):
    """The broker a consumer process uses: Redis at ``where`` (keys prefixed by the home's
    name), else the embedded broker in ``home/broker.db``."""
    if where.startswith("redis"):
        from adapters.broker_redis import RedisBroker

        return RedisBroker.from_url(where, prefix=home.name)
    return SqliteBroker(home / "broker.db")


_CONSUME = """
import json
import sys
from pathlib import Path
from mlops.features import FeatureSet
from mlops.routing import RouteTable
from mlops.settings import load_settings
from tests.support.stream import child_broker, stream_consumer

settings = load_settings(sys.argv[1], environ={})
onnx, home, where = Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]), sys.argv[4]
consumer = stream_consumer(
    settings.dataset, FeatureSet.from_settings(settings), onnx, home, child_broker(home, where),
    checkpoint_every=int(sys.argv[6]),
    candidate=Path(sys.argv[7]).read_bytes() if sys.argv[7] else None,
    routes=RouteTable(**json.loads(sys.argv[8])) if sys.argv[8] else None,
)
consumer.start()
print("started", flush=True)
while (result := consumer.step(int(sys.argv[5]))) is not None:
    print(result.next_offset, flush=True)
consumer.checkpoint()
"""


def kill_and_resume(
    home: Path,
    model_file: Path,
    where: str,
    kills_wanted: int,
    seed: int,
    total: int,
    batch: int = 500,
    max_wait: float = 0.35,
    min_wait: float = 0.05,
    checkpoint_every: int = 3,
    candidate_file: Path | None = None,
    routes: dict | None = None,
) -> int:
    """Run the consumer in a subprocess, SIGKILL it at a random moment ``kills_wanted`` times,
    then let it finish; returns the number of kills.

    A kill lands a random ``min_wait``..``max_wait`` seconds after the consumer started, or
    sooner: once the committed offset (the child prints it after each batch) passes kill k's
    share of the ``total`` events, ``k+1 / (kills_wanted+1)``, the kill follows within a random
    fraction of a batch. So a fast consumer cannot finish the topic before its last kill, and
    every kill still hits some random point of reading, scoring, writing or committing.
    ``candidate_file`` and ``routes`` (``RouteTable`` fields) make the consumer route events
    to a candidate."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = np.random.default_rng(seed)
    kills = 0
    while True:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CONSUME, str(FEATURES_YAML), str(model_file), str(home), where]
            + [
                str(batch),
                str(checkpoint_every),
                str(candidate_file or ""),
                json.dumps(routes) if routes else "",
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: readline takes no bytes of the offsets that follow
        )
        assert proc.stdout.readline().strip() == b"started"
        if kills < kills_wanted:
            cap = total * (kills + 1) // (kills_wanted + 1)
            deadline = time.monotonic() + float(rng.uniform(min_wait, max_wait))
            if _wait_for_offset(proc, cap, deadline):
                time.sleep(float(rng.uniform(0.0, 0.01)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=3600)
        proc.stdout.close()
        if proc.returncode == 0:
            return kills
        assert proc.returncode == -signal.SIGKILL, f"the consumer exited with code {proc.returncode}"


def _wait_for_offset(proc: subprocess.Popen, offset: int, deadline: float) -> bool:
    """Read the child's committed offsets until one reaches ``offset`` (True) or ``deadline``
    passes or the child exits (False)."""
    fd = proc.stdout.fileno()
    buffered = b""
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return False
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        if any(int(line) >= offset for line in lines if line.strip().isdigit()):
            return True
    return False
