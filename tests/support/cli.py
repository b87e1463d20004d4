"""The ``mlops`` command line run as a user runs it: a separate process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping


def run_cli(env: Mapping[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``mlops ARGS`` (``python -m mlops_cli.main``) in a subprocess with exactly ``env`` as its
    environment; its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mlops_cli.main", *args],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=timeout,
    )
