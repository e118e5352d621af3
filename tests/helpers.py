"""Helpers shared by tests (imported, unlike conftest fixtures)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile

import psutil

SHM_DIR = "/dev/shm"


def _owned_segments() -> tuple[dict[str, int], set[int]]:
    """Our-format segments in /dev/shm (name -> owner pid), and the pids of
    this process and its descendants (kernels, workers)."""
    import psutil

    from shm_kernel_safe.memory.naming import parse_name

    owners: dict[str, int] = {}
    if os.path.isdir(SHM_DIR):
        for entry in os.listdir(SHM_DIR):
            parsed = parse_name(entry)
            if parsed is not None:
                owners[entry] = parsed.pid
    me = psutil.Process()
    family = {me.pid} | {p.pid for p in me.children(recursive=True)}
    return owners, family


def shm_entries() -> set[str]:
    """Our segments that this test run is answerable for: made by this
    process, its children (kernels, workers), or processes now dead; not
    those of an unrelated live process (a benchmark running alongside)."""
    import psutil

    owners, family = _owned_segments()
    return {e for e, pid in owners.items() if pid in family or not psutil.pid_exists(pid)}


def foreign_owners() -> set[int]:
    """Owners of our-format segments that are alive and not this process or
    its descendants: another session's kernel, a benchmark running alongside."""
    import psutil

    owners, family = _owned_segments()
    return {pid for pid in owners.values() if pid not in family and psutil.pid_exists(pid)}


#: Starts a command with SIGINT ignored, as a non-interactive shell starts
#: ``cmd &`` and as some job runners start everything (the disposition
#: survives ``exec``).
SIGINT_IGNORED = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def run_python(
    code: str,
    *args: str,
    timeout: float = 60,
    env: dict | None = None,
    cwd: str | None = None,
    sigint_ignored: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``code`` as a script file in a fresh interpreter.

    A file, not ``-c``: under spawn the children re-import the main script,
    exactly as they did for the user who first hit these bugs. With
    ``sigint_ignored`` the interpreter starts with SIGINT ignored: a script
    that relies on Ctrl-C must set the handler itself.
    """
    import tempfile

    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "script.py")
        with open(script, "w") as fh:
            fh.write(code)
        launcher = [sys.executable, "-c", SIGINT_IGNORED] if sigint_ignored else []
        cmd = [*launcher, sys.executable, script, *args]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=cwd or tmp,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_hung_script(proc)
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_hung_script(proc: subprocess.Popen) -> None:
    """A script that hangs fails its test; it must not leave its workers
    running (they hold its pipes: waiting for them would hang the test too)
    nor its segments and semaphores behind. Resource trackers are spared:
    once everything else of the script is dead they unlink what it
    registered (loky's semaphores) and exit."""
    import psutil

    from shm_kernel_safe.memory.janitor import cleanup_stale

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    trackers = []
    for p in tree:
        try:
            if "resource_tracker" in " ".join(p.cmdline()):
                trackers.append(p)
                continue
            p.kill()
        except psutil.Error:
            pass
    proc.communicate()
    psutil.wait_procs(trackers, timeout=10)
    cleanup_stale()  # the script's segments: their owner is dead now


# Long-lived helpers that multiprocessing / loky start once per parent and
# that die with it; they are not leaks of a test.
_INFRA_MARKERS = ("resource_tracker", "forkserver", "semaphore_tracker")


def worker_children() -> list[psutil.Process]:
    """This process's live descendants that are workers (not the helpers
    every parent keeps: forkservers, resource trackers)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if any(m in cmd for m in _INFRA_MARKERS):
            continue
        out.append(child)
    return out


@contextlib.contextmanager
def small_tmpfs(size: str):
    """A tmpfs of ``size`` (``"1m"``) mounted in a fresh folder, for a disk
    or a /dev/shm that fills; the test is skipped where mounting needs root."""
    import pytest

    mnt = tempfile.mkdtemp()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], capture_output=True
    )
    if result.returncode != 0:
        os.rmdir(mnt)
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)
