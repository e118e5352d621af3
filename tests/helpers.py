"""Helpers shared by tests (imported, unlike conftest fixtures)."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

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


def loky_sems() -> set[str]:
    """loky's named semaphores of this process in /dev/shm (one listdir)."""
    prefix = f"sem.loky-{os.getpid()}-"
    return {e for e in os.listdir(SHM_DIR) if e.startswith(prefix)}


def cluster_sems() -> set[str]:
    """The /dev/shm entries of the semaphores our dask cluster holds by
    design: each nanny's two queues to its worker process (made anew when a
    worker restarts), made in this process through loky's semaphores. The
    fixtures that keep the cluster for a module answer for them."""
    cluster = sys.modules.get("shm_kernel_safe.transports.dask.cluster")
    local = getattr(cluster, "_local", None) or {}
    nannies = getattr(local.get("cluster"), "workers", None) or {}
    locks: list[Any] = []
    for nanny in list(nannies.values()):
        process = getattr(nanny, "process", None)
        for q in (getattr(process, "init_result_q", None), getattr(process, "child_stop_q", None)):
            locks += [getattr(q, a, None) for a in ("_rlock", "_wlock", "_sem")]
    return _entries(locks)


def live_pool_sems() -> set[str]:
    """The /dev/shm entries of the semaphores the local transport's live
    pools hold by design (the warm one, private ones of runs in progress):
    a call queue and a result queue (locks and size semaphore), the pool's
    management and claim locks, each worker's exit lock."""
    mod = sys.modules.get("shm_kernel_safe.transports.local.pool")
    if mod is None:
        return set()
    with mod._lock:
        pools = [p for p in (mod._warm, *mod._private) if p is not None]
    locks: list[Any] = []
    for pool in pools:
        locks += [getattr(pool, "_processes_management_lock", None)]
        locks += [pool.__dict__.get("_sks_claim_lock")]
        for q in (getattr(pool, "_call_queue", None), getattr(pool, "_result_queue", None)):
            locks += [getattr(q, a, None) for a in ("_rlock", "_wlock", "_sem")]
        workers = list(pool.__dict__.get("_sks_workers", ()))
        workers += list((getattr(pool, "_processes", None) or {}).values())
        locks += [getattr(w, "_worker_exit_lock", None) for w in workers]
    return _entries(locks)


def _entries(locks: list[Any]) -> set[str]:
    names = {getattr(getattr(lock, "_semlock", None), "name", None) for lock in locks}
    return {"sem." + n.lstrip("/") for n in names if n}


def settle(left: Any, seconds: float = 3.0) -> set[str]:
    """``left()`` once it is empty, or after ``seconds``: loky releases a
    queue's semaphores when its feeder thread ends and the queue is collected."""
    deadline = time.monotonic() + seconds
    while (found := left()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    return found


def sem_holders(entries: set[str]) -> str:
    """What keeps the semaphores of ``entries`` alive, for a failure message:
    the objects that refer to each one still in memory, and the stacks of
    loky's feeder and manager threads (a feeder that never ends holds its
    queue and the queue's three semaphores). Slow (walks the heap); only
    called once a leak is found."""
    import sys
    import threading
    import traceback

    names = {"/" + e.removeprefix("sem.") for e in entries}
    lines = []
    for obj in gc.get_objects():
        semlock = getattr(obj, "_semlock", None) if not isinstance(obj, type) else None
        name = getattr(semlock, "name", None)
        if name in names:
            refs = [type(r).__name__ for r in gc.get_referrers(obj) if r is not lines]
            lines.append(f"{name}: {type(obj).__name__} referred to by {refs[:6]}")
    frames = sys._current_frames()
    for thread in threading.enumerate():
        if thread.name.startswith(("QueueFeederThread", "ExecutorManagerThread")):
            stack = "".join(traceback.format_stack(frames.get(thread.ident), limit=4))
            lines.append(f"thread {thread.name} alive at:\n{stack}")
    return "\n".join(lines) or "no object in memory holds them"
