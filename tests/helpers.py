"""Helpers shared by tests (imported, unlike conftest fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys

SHM_DIR = "/dev/shm"


def shm_entries() -> set[str]:
    if not os.path.isdir(SHM_DIR):
        return set()
    return {e for e in os.listdir(SHM_DIR) if e.startswith("sks")}


def run_python(
    code: str, *args: str, timeout: float = 60, env: dict | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``code`` as a script file in a fresh interpreter.

    A file, not ``-c``: under spawn the children re-import the main script,
    exactly as they did for the user who first hit these bugs.
    """
    import tempfile

    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "script.py")
        with open(script, "w") as fh:
            fh.write(code)
        return subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd or tmp,
        )
