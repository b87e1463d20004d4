"""The pure layer stays pure: ``mlops`` imports no orchestrator, registry, server or database,
and its modules import each other in one direction."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

FORBIDDEN = ("prefect", "mlflow", "bentoml", "duckdb")


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_settings_load_without_the_data_generator() -> None:
    """Building the default settings (whose dataset is the generated card transactions) does not
    import ``mlops.datagen``, which itself imports the settings: no import cycle."""
    loaded = _run(
        """
        import sys
        from mlops.settings import Settings
        Settings()
        print("mlops.datagen" in sys.modules)
        """
    )
    assert loaded == "False"


@pytest.mark.slow
def test_the_pure_layer_imports_no_external_system() -> None:
    """Every module under ``mlops/`` imports without prefect, mlflow, bentoml or duckdb."""
    leaked = _run(
        f"""
        import importlib, pkgutil, sys
        import mlops
        for m in pkgutil.walk_packages(mlops.__path__, "mlops."):
            importlib.import_module(m.name)
        print(sorted({{n.split(".")[0] for n in sys.modules}} & set({FORBIDDEN!r})))
        """
    )
    assert leaked == "[]"
