"""Process starts that never re-run the user's main module.

Under spawn and forkserver, multiprocessing tells each child to import the
parent's ``__main__`` first. In a notebook or console that module is
IPython's, in a script without ``if __name__ == "__main__"`` it is the
script itself, which would run again in every worker. Children started
through these contexts get preparation data stripped of ``__main__``:
what the work needs reaches them by value (cloudpickle). Used by the local
pools and by the nannies of our own dask cluster.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context as mp_context
import multiprocessing.spawn as mp_spawn
import sys
import threading
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


class _MainFreeSpawnProcess(mp_context.SpawnProcess):
    def start(self) -> None:
        with _main_free_preparation():
            super().start()


class _MainFreeSpawnContext(mp_context.SpawnContext):
    Process = _MainFreeSpawnProcess


if hasattr(mp_context, "ForkServerProcess"):

    class _MainFreeForkServerProcess(mp_context.ForkServerProcess):
        def start(self) -> None:
            with _main_free_preparation():
                super().start()

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
        return multiprocessing.get_context("fork")
    raise ValueError(f"unknown start method {start_method!r}")
