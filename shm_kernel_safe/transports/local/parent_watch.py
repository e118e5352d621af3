"""Workers end with the process that owns their pool, however it ends.

A kernel killed by the OOM killer, or a worker killed while it ran a nested
``parallel_map``, runs no clean-up: its workers would go on taking items
from the run's shared counter, then idle for ``IDLE_TIMEOUT``, keeping the
resource trackers (which exit only when every holder of their pipe is gone)
and the run's named semaphores alive with them. So each worker watches its
pool's owner from a daemon thread and exits the moment the owner is gone.
What follows cascades from that: a worker's own pools watch the worker, a
forkserver exits when the last holder of its "alive" pipe is gone, and the
trackers when the last holder of theirs is.

The owner's pid is passed to the worker (under forkserver, the worker's
parent is the forkserver, not the owner). On Linux >= 5.3 the thread blocks
on a pidfd of the owner, which becomes readable when the owner exits: no
polling, no pid-reuse race after it is opened. Elsewhere it polls every
:data:`POLL_INTERVAL` seconds.

The thread needs the GIL to act: an item stuck in C code that holds it (a
pathological regular expression) would keep its worker. Under forkserver
(the default) the kernel also kills the worker, with no GIL needed: it asks
for SIGKILL when its parent, the forkserver, exits (``PR_SET_PDEATHSIG``),
and closes its copy of the forkserver's "alive" pipe, so that the
forkserver exits as soon as the owner is gone rather than when its last
child is (a worker's own nested pools start their own forkserver).

``PR_SET_PDEATHSIG`` is not used where the owner is the parent (spawn,
fork): it fires when the *thread* that forked the child exits, and loky
starts workers from whichever thread submits or from its manager thread
(ours include a short-lived start-up thread), so it would kill healthy
workers.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
import time

from ..._platform import pid_alive

#: Seconds between liveness checks where there is no pidfd.
POLL_INTERVAL = 0.2

#: Exit status of a worker that ended because its pool's owner was gone.
OWNER_GONE_EXIT = 75

_PR_SET_PDEATHSIG = 1


def _die_with_forkserver() -> None:
    """SIGKILL this forkserver child when the forkserver exits, and let the
    forkserver exit with the owner (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    from multiprocessing import forkserver

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int) and getattr(server, "_forkserver_pid", None) is None:
        with contextlib.suppress(OSError):
            os.close(alive)
        server._forkserver_alive_fd = None


def _owner_gone() -> None:
    # os._exit: the owner is gone, nobody waits for a result, and the main
    # thread may be inside an item that must not run on.
    os._exit(OWNER_GONE_EXIT)


def _wait_pidfd(fd: int) -> None:
    with contextlib.suppress(OSError):
        while True:
            readable, _, _ = select.select([fd], [], [])
            if readable:
                break
    _owner_gone()


def _poll(pid: int, direct_parent: bool) -> None:
    while True:
        if (direct_parent and os.getppid() != pid) or not pid_alive(pid):
            _owner_gone()
        time.sleep(POLL_INTERVAL)


def watch_owner(owner_pid: int) -> None:
    """End this process as soon as ``owner_pid`` is gone.

    Called once in each worker (``pool._init_worker``) so that a pool never
    outlives the process that made it, whatever killed that process.

    Parameters
    ----------
    owner_pid : int
        The process that created the pool (not necessarily the parent: a
        forkserver sits in between).
    """
    if owner_pid == os.getpid():
        return
    if os.getppid() != owner_pid:  # a forkserver's child: one thread, exits with the owner
        _die_with_forkserver()
    pidfd_open = getattr(os, "pidfd_open", None)
    fd = None
    if pidfd_open is not None:
        try:
            fd = pidfd_open(owner_pid)
        except ProcessLookupError:
            _owner_gone()
        except OSError:  # kernel without pidfds, or a seccomp filter
            fd = None
    if fd is not None:
        target, args = _wait_pidfd, (fd,)
    else:
        target, args = _poll, (owner_pid, os.getppid() == owner_pid)
    name = "shm_kernel_safe-owner-watch"
    threading.Thread(target=target, args=args, name=name, daemon=True).start()
