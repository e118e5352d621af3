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

The thread needs the GIL to act: an item stuck in C code that holds it
(a pathological regular expression) keeps its worker until it returns.

``PR_SET_PDEATHSIG`` is not used: it fires when the *thread* that forked
the child exits, and loky starts workers from whichever thread submits or
from its manager thread (ours include short-lived start-up threads), so it
would kill healthy workers. Under forkserver the parent is the forkserver,
which outlives the owner for as long as any of its children holds the
"alive" pipe it handed them: the workers themselves.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time

from ..._platform import pid_alive

#: Seconds between liveness checks where there is no pidfd.
POLL_INTERVAL = 0.2

#: Exit status of a worker that ended because its pool's owner was gone.
OWNER_GONE_EXIT = 75


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
