"""The bento is built from the tested lock: bentofile.yaml installs requirements.lock.txt,
which is uv.lock exported, and a built bento's service starts and answers /predict.

The build runs with every proxy pointed at a closed loopback port and pip/uv told to stay
offline, so a build that tried to resolve or download anything would fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.support.serving import configured, feature_records

REPO = Path(__file__).resolve().parent.parent
LOCK_EXPORT = [
    "export",
    "--frozen",
    "--no-dev",
    "--no-hashes",
    "--no-emit-project",
    "--no-header",
    "--no-annotate",
]
"""The `uv` arguments that produce requirements.lock.txt (as bentofile.yaml says)."""
OFFLINE = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
    "PIP_NO_INDEX": "1",
    "UV_OFFLINE": "1",
}
START_TIMEOUT_S = 240


def _bentofile() -> dict:
    return yaml.safe_load((REPO / "bentofile.yaml").read_text())


def _requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _requirements(text: str) -> set[str]:
    """The requirements of a requirements file, normalised (BentoML rewrites markers' quoting)."""
    from packaging.requirements import Requirement

    return {str(Requirement(line)) for line in _requirement_lines(text)}


def test_bentofile_installs_the_exported_lock_and_resolves_nothing():
    """bentofile.yaml names requirements.lock.txt, pins nothing of its own and does not lock
    again at build time; the file is exactly what `uv export` makes of uv.lock now."""
    python = _bentofile()["python"]
    assert python["requirements_txt"] == "requirements.lock.txt" and python["lock_packages"] is False
    assert "packages" not in python
    uv = shutil.which("uv")
    assert uv is not None, "uv is needed to export the lock"
    out = subprocess.run([uv, *LOCK_EXPORT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    committed = (REPO / "requirements.lock.txt").read_text()
    assert committed == out.stdout, (
        "requirements.lock.txt is out of date with uv.lock; run: uv "
        + " ".join(LOCK_EXPORT)
        + " -o requirements.lock.txt"
    )
    pins = _requirement_lines(committed)
    assert all("==" in line for line in pins) and any(p.startswith("bentoml==") for p in pins)


def _bentoml() -> str:
    return str(Path(sys.executable).with_name("bentoml"))


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A bento built offline from the repository, in its own BENTOML_HOME."""
    bentoml_home = tmp_path_factory.mktemp("bentoml")
    env = os.environ | OFFLINE | {"BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run(
        [_bentoml(), "build", str(REPO), "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [bento_yaml] = bentoml_home.glob("bentos/mlops-serving/*/bento.yaml")
    yield bento_yaml.parent, env


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_bento_built_offline_carries_the_locked_requirements_and_its_code_imports_alone(
    bento: tuple[Path, dict[str, str]],
):
    """`bentoml build` succeeds with no network; the bento's requirements are the lock's pins
    (every one of them, no others but BentoML's own line); every module the bento carries
    imports from the bento alone (the include list is closed under the service's imports)."""
    path, _env = bento
    text = (path / "bento.yaml").read_text()
    assert "service: serving.service:ScoringService" in text
    shipped = _requirements((path / "env" / "python" / "requirements.txt").read_text())
    locked = _requirements((REPO / "requirements.lock.txt").read_text())
    assert len(locked) > 100 and locked <= shipped, sorted(locked - shipped)[:5]
    assert shipped - locked <= {"bentoml==1.4.40"}, sorted(shipped - locked)
    assert not (path / "env" / "python" / "requirements.lock.txt").exists()  # no re-lock at build
    src = path / "src"
    modules = sorted(
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for p in src.rglob("*.py")
    )
    assert "serving.service" in modules and "adapters.runtime" in modules
    probe = (
        "import importlib, sys\n"
        f"sys.path = [{str(src)!r}] + [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
        f"for name in {modules!r}:\n"
        "    mod = importlib.import_module(name)\n"
        f"    assert mod.__file__.startswith({str(src)!r}), (name, mod.__file__)\n"
        "from mlops.settings import load_settings\n"
        "print(load_settings(environ={}).serving.max_body_bytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_the_built_bento_serves_and_answers_predict(
    bento: tuple[Path, dict[str, str]], tmp_path: Path, small_model: bytes, mlflow_template: Path
):
    """`bentoml serve` of the built bento (its own copy of the code, not the repository's)
    starts, becomes ready with the registry's champion and answers /predict with the
    model's scores."""
    from conftest import register_versions

    from adapters.services import free_port, http_ok, started
    from mlops.datagen import generate
    from mlops.onnx_model import OnnxScorer
    from registry.mlflow_registry import ModelRegistry

    path, build_env = bento
    with configured(tmp_path / "home", mlflow_template) as (settings, env):
        env |= {"BENTOML_HOME": build_env["BENTOML_HOME"], "BENTOML_DO_NOT_TRACK": "true"}
        [version] = register_versions(settings, small_model, [{"roc_auc": 0.8}])
        ModelRegistry(settings).move_alias(settings.training.model_name, "champion", version, reason="bento")
    port = free_port()
    log = tmp_path / "bento.log"
    argv = [_bentoml(), "serve", str(path), "--host", "127.0.0.1", "--port", str(port)]
    ready = http_ok(f"http://127.0.0.1:{port}/v2/health/ready")
    with started(argv, ready, log, env=env, cwd=tmp_path, timeout=START_TIMEOUT_S, name="bento") as proc:
        rows = feature_records(generate(20, seed=4), settings.dataset)
        resp = httpx.post(
            f"http://127.0.0.1:{port}/predict", json={"records": [{"features": r} for r in rows]}, timeout=30
        )
        assert resp.status_code == 200, resp.text
        scores = [p["score"] for p in resp.json()["predictions"]]
        columns = {n: [r[n] for r in rows] for n in settings.dataset.feature_names}
        expect = OnnxScorer(small_model, settings.dataset).predict_proba(columns)
        np.testing.assert_allclose(scores, expect, rtol=1e-6)
        import psutil

        cwds = {c.cwd() for c in psutil.Process(proc.pid).children(recursive=True) if c.is_running()}
        assert str(path / "src") in cwds, cwds  # the service runs in the bento's copy of the code
