"""Running the CLI in a child process, for tests that need real signals and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys


def run_kd2edge(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI in a child process (its own session, so its children can be cleaned up)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kd2edge.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, start_new_session=True)
