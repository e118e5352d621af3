"""Process starts that never re-run the user's main module, and start plain.

Under spawn and forkserver, multiprocessing tells each child to import the
parent's ``__main__`` first. In a notebook or console that module is
IPython's, in a script without ``if __name__ == "__main__"`` it is the
script itself, which would run again in every worker. Children started
through these contexts get preparation data stripped of ``__main__``:
what the work needs reaches them by value (cloudpickle). Used by the local
pools and by the nannies of our own dask cluster.

Every start also goes through :func:`plain_start`: the new process (a worker,
the forkserver, a resource tracker) starts with SIGINT blocked, so a kernel
interrupt that lands during a cold start (it signals the whole process
group) cannot kill it halfway through its imports, and it starts outside a
debugger attached to the kernel.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context as mp_context
import multiprocessing.spawn as mp_spawn
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

_prep_lock = threading.Lock()


@contextlib.contextmanager
def _main_free_preparation():
    """Start children without telling them to import ``__main__``."""
    with _prep_lock:
        original = mp_spawn.get_preparation_data

        def stripped(name: str) -> dict[str, Any]:
            # IPython's own __main__ (a DummyMod) has no __spec__, on which
            # the stdlib trips; the main module is dropped below anyway.
            main = sys.modules.get("__main__")
            patched = main is not None and not hasattr(main, "__spec__")
            if patched:
                main.__spec__ = None
            try:
                data = original(name)
            finally:
                if patched:
                    with contextlib.suppress(AttributeError):
                        del main.__spec__
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        mp_spawn.get_preparation_data = stripped
        try:
            yield
        finally:
            mp_spawn.get_preparation_data = original


@contextlib.contextmanager
def _outside_debugger() -> Iterator[None]:
    """Start processes from this thread without debugpy's patching.

    debugpy (the JupyterLab/VS Code debugger, via ipykernel) patches
    ``os.fork``, ``_posixsubprocess.fork_exec`` and the ``exec*`` functions so
    that every new Python process connects back to the debugger and then
    waits in ``wait_for_ready_to_run`` for a client that never attaches to
    pool workers: the run hangs. pydevd's own switch for "this start is not
    a debuggee", ``skip_subprocess_arg_patch``, is thread-local, so it is
    entered in the thread that starts the process. Items cannot be stepped
    through in workers anyway: ``--backend serial`` runs them in the kernel.
    """
    monkey = sys.modules.get("_pydev_bundle.pydev_monkey")
    skip = getattr(monkey, "skip_subprocess_arg_patch", None)
    if skip is None:
        yield
        return
    with skip():
        yield


@contextlib.contextmanager
def plain_start() -> Iterator[None]:
    """Start child processes from this thread as plain, interrupt-proof processes.

    SIGINT is blocked in this thread while the child is made, and a child
    inherits the mask through fork and exec: a kernel interrupt during a
    cold start (it goes to the whole process group) then cannot raise
    ``KeyboardInterrupt`` in a forkserver importing its preload modules or
    in a worker before its initializer ignores SIGINT, which would print a
    traceback on the kernel's stderr and leave a broken pool's semaphores
    behind. The interrupt itself is not lost: the kernel's other threads
    take it (the main thread raises as usual), or it is delivered when the
    mask is restored. Workers ignore SIGINT anyway (``pool._init_worker``).
    """
    sigmask = getattr(signal, "pthread_sigmask", None)
    previous = sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if sigmask is not None else None
    try:
        with _outside_debugger():
            yield
    finally:
        if previous is not None:
            sigmask(signal.SIG_SETMASK, previous)


class _MainFreeSpawnProcess(mp_context.SpawnProcess):
    def start(self) -> None:
        with plain_start(), _main_free_preparation():
            super().start()


class _MainFreeSpawnContext(mp_context.SpawnContext):
    Process = _MainFreeSpawnProcess


if hasattr(mp_context, "ForkServerProcess"):

    class _MainFreeForkServerProcess(mp_context.ForkServerProcess):
        def start(self) -> None:
            with plain_start(), _main_free_preparation():
                super().start()

    class _PlainForkProcess(mp_context.ForkProcess):
        def start(self) -> None:
            with plain_start():
                super().start()

    class _PlainForkContext(mp_context.ForkContext):
        Process = _PlainForkProcess

    class _MainFreeForkServerContext(mp_context.ForkServerContext):
        Process = _MainFreeForkServerProcess


def make_context(
    start_method: str, preload: tuple[str, ...] = ()
) -> multiprocessing.context.BaseContext:
    """A multiprocessing context whose children never import ``__main__``.

    ``preload`` lists modules a forkserver imports once for all its children.
    """
    if start_method == "spawn":
        return _MainFreeSpawnContext()
    if start_method == "forkserver":
        ctx = _MainFreeForkServerContext()
        ctx.set_forkserver_preload(list(preload))
        return ctx
    if start_method == "fork":
        return _PlainForkContext()
    raise ValueError(f"unknown start method {start_method!r}")
