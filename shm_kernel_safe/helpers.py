"""The helper processes multiprocessing starts for us, and a clean kernel exit.

A forkserver (our default start method on Linux) and the resource tracker
are child processes of the kernel that outlive any pool. At shutdown,
ipykernel SIGTERMs every child in its process group and then waits until
none is listed. Nothing reaps those two helpers once they are killed, so
they stay listed as zombies, ipykernel keeps waiting, and the frontend
finally kills the kernel: no ``atexit`` handler runs, and segments and
semaphores leak.

So when a pool is started inside a kernel, we wrap that kernel's
``do_shutdown`` (which ipykernel calls *before* it kills children) to free
our segment names, stop our pools, and stop and reap the helpers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

_lock = threading.Lock()
_hooked: dict[int, Any] = {}  # id(kernel) -> kernel


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


def shutdown_everything() -> None:
    """What a kernel (or interpreter) that is going away needs from us."""
    from . import pool, segments

    segments.unlink_all_owned()
    pool.shutdown_all(join_timeout=1.0)
    dask = sys.modules.get("shm_kernel_safe.dask_cluster")
    if dask is not None:
        dask.close_all()
    stop_forkserver()
    stop_resource_trackers()


def hook_kernel_shutdown() -> None:
    """Run :func:`shutdown_everything` first when this kernel shuts down."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None or not hasattr(kernel, "do_shutdown"):
        return
    with _lock:
        if id(kernel) in _hooked:
            return
        original = kernel.do_shutdown

        def do_shutdown(restart: bool) -> Any:
            with contextlib.suppress(Exception):
                shutdown_everything()
            return original(restart)

        do_shutdown.__shm_kernel_safe_original__ = original  # type: ignore[attr-defined]
        kernel.do_shutdown = do_shutdown
        _hooked[id(kernel)] = kernel


def unhook_kernel_shutdown() -> None:
    with _lock:
        for kernel in _hooked.values():
            if "do_shutdown" in vars(kernel):
                del kernel.do_shutdown
        _hooked.clear()
