"""cleanup_stale() removes exactly the segments of dead processes of this user."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.memory import naming

CHILD = r"""
import sys, time
import shm_kernel_safe as sks
a = sks.zeros(1000)
b = sks.share(list(range(50)))
print(sks.handle_of(a).name, b.name, flush=True)
time.sleep(600)
"""


def _spawn_owner():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    names = proc.stdout.readline().split()
    assert len(names) == 2
    return proc, names


@pytest.mark.timeout(60)
def test_janitor_removes_only_dead_owners_segments():
    stale_before = {seg.name for seg in sks.find_stale()}  # a crashed session's, say
    dead, dead_names = _spawn_owner()
    alive, alive_names = _spawn_owner()
    mine = sks.zeros(10)
    my_name = sks.handle_of(mine).name
    # A name in our format but another user's tag, and a foreign name: untouchable.
    foreign = [naming.new_name(pid=dead.pid, user_tag="zzzzzz"), "psm_notours"]
    for name in foreign:
        with open(f"/dev/shm/{name}", "wb"):
            pass
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        for name in dead_names:
            assert os.path.exists(f"/dev/shm/{name}")  # SIGKILL left them behind
        stale = [s for s in sks.find_stale() if s.name not in stale_before]
        assert {s.name for s in stale} == set(dead_names)
        assert all(s.owner_pid == dead.pid for s in stale)
        removed = sks.cleanup_stale()
        assert {s.name for s in removed} - stale_before == set(dead_names)
        for name in dead_names:
            assert not os.path.exists(f"/dev/shm/{name}")
        for name in [*alive_names, my_name, *foreign]:
            assert os.path.exists(f"/dev/shm/{name}")
        assert sks.cleanup_stale() == []
    finally:
        alive.kill()
        alive.wait(10)
        sks.cleanup_stale()  # the second owner is dead now too
        for name in foreign:
            os.unlink(f"/dev/shm/{name}")
        time.sleep(0)
    del mine


SEMAPHORE_OWNER = r"""
import os, _multiprocessing
from loky.backend.synchronize import SemLock
# A named semaphore named by loky itself, left behind as by a process killed
# together with its resource tracker: never unlinked.
name = SemLock._make_name()
_multiprocessing.SemLock(1, 1, 1, name, False)
print(name, flush=True)
os._exit(0)
"""


@pytest.mark.timeout(60)
def test_janitor_removes_loky_semaphores_of_dead_processes_only():
    import _multiprocessing

    out = subprocess.run(
        [sys.executable, "-c", SEMAPHORE_OWNER], capture_output=True, text=True, check=True
    )
    dead_name = "sem." + out.stdout.strip().lstrip("/")
    live_name = f"sem.loky-{os.getpid()}-live_x9q"
    mine = _multiprocessing.SemLock(1, 1, 1, "/" + live_name[4:], False)
    try:
        assert os.path.exists(f"/dev/shm/{dead_name}") and os.path.exists(f"/dev/shm/{live_name}")
        assert dead_name in {s.name for s in sks.find_stale()}
        assert live_name not in {s.name for s in sks.find_stale()}
        removed = sks.cleanup_stale()
        assert dead_name in {s.name for s in removed}
        assert not os.path.exists(f"/dev/shm/{dead_name}")
        assert os.path.exists(f"/dev/shm/{live_name}")  # its owner is alive
    finally:
        _multiprocessing.sem_unlink("/" + live_name[4:])
        del mine
