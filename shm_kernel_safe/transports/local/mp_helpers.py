"""multiprocessing's helper processes, stopped and reaped when a kernel shuts down.

A forkserver (our default start method on Linux) and the resource trackers
(the standard library's and loky's) are child processes of the kernel that
outlive any pool. At shutdown, ipykernel SIGTERMs every child in its process
group and then waits until none is listed. Nothing reaps those helpers once
they are killed, so they stay listed as zombies, ipykernel keeps waiting,
and the front end finally kills the kernel: no ``atexit`` handler runs, and
segments and semaphores leak. So they are stopped here, on the
``kernel-shutdown`` event, after the pools.
"""

from __future__ import annotations

import contextlib
import os

from ... import lifecycle


def stop_forkserver() -> None:
    """Stop multiprocessing's forkserver, if running, and reap it."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if hasattr(server, "_stop"):  # Python 3.12+
        with contextlib.suppress(Exception):
            server._stop()
        return
    with server._lock:  # Python 3.10, 3.11: the same steps by hand
        pid = server._forkserver_pid
        if pid is None:
            return
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        server._forkserver_pid = None
        address = server._forkserver_address
        if address and not address.startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(address)
        server._forkserver_address = None


def stop_resource_trackers() -> None:
    """Stop the stdlib's and loky's resource trackers, if running, and reap them.

    Closing a tracker's pipe is how it learns its users are gone: it then
    cleans what is still registered and exits. Only called at shutdown.
    """
    trackers = []
    with contextlib.suppress(ImportError):
        from multiprocessing import resource_tracker

        trackers.append(resource_tracker._resource_tracker)
    with contextlib.suppress(ImportError):
        from loky.backend import resource_tracker as loky_tracker

        trackers.append(loky_tracker._resource_tracker)
    for tracker in trackers:
        if hasattr(tracker, "_stop"):  # Python 3.12+ / recent loky
            with contextlib.suppress(Exception):
                tracker._stop()
            continue
        with contextlib.suppress(Exception), tracker._lock:
            if getattr(tracker, "_fd", None) is None:
                continue
            os.close(tracker._fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(tracker._pid, 0)
            tracker._fd = None
            tracker._pid = None


def release_semaphores() -> list[str]:
    """Unlink the named semaphores this process still has registered.

    Each is unlinked by a finalizer when its object is collected, or at
    interpreter exit. A pool that was interrupted or killed can stay
    referenced past its shutdown (the traceback IPython keeps of the error
    holds its frames), and the trackers are stopped before exit: they would
    report its semaphores as "leaked" and unlink them themselves. Running
    those finalizers now does what exit would, before the trackers stop.
    Only called at kernel shutdown, after the pools.
    """
    from multiprocessing import util

    released = []
    for finalizer in list(util._finalizer_registry.values()):
        callback = getattr(finalizer, "_callback", None)
        if getattr(callback, "__qualname__", "") != "SemLock._cleanup":
            continue
        args = getattr(finalizer, "_args", ()) or ()
        with contextlib.suppress(Exception):  # unlinked already, by anyone
            finalizer()
            released.extend(str(a) for a in args[:1])
    return released


def stop_helpers(event: str = lifecycle.KERNEL_SHUTDOWN) -> None:
    """Stop the forkserver and the resource trackers (a kernel going away)."""
    stop_forkserver()
    release_semaphores()
    stop_resource_trackers()
