"""Process lifetimes in one place: one registry of closers, one ``atexit``,
one kernel-shutdown hook.

Whatever outlives a call (named segments, warm pools, our dask cluster, the
clients we opened, arrays kept on clusters, multiprocessing's helper
processes) registers a *closer* here, with the events it must run on:

``exit``
    the interpreter is exiting (one ``atexit`` handler for the package);
``kernel-shutdown``
    the kernel is shutting down: ipykernel SIGTERMs every child of its
    process group and waits until none is listed, so helpers that nobody
    reaps (a forkserver, a resource tracker) would keep it waiting until the
    front end kills it, and then no ``atexit`` handler runs at all;
``unload``
    ``%unload_ext shm_kernel_safe``: stop what the extension started, keep
    what the user holds (named segments stay named).

Closers run in ``order`` (lowest first), each guarded so one failing cannot
stop the others. A leaf module: every layer may register here, and this
module imports none of them.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

EXIT = "exit"
KERNEL_SHUTDOWN = "kernel-shutdown"
UNLOAD = "unload"
EVENTS = frozenset({EXIT, KERNEL_SHUTDOWN, UNLOAD})

Closer = Callable[[str], None]


@dataclass(frozen=True)
class _Entry:
    order: int
    name: str
    closer: Closer
    events: frozenset[str]


_lock = threading.RLock()
_closers: dict[str, _Entry] = {}
_hooked: dict[int, Any] = {}  # id(kernel) -> kernel whose do_shutdown we wrapped


def register(name: str, closer: Closer, *, order: int, events: Iterable[str] = EVENTS) -> None:
    """Run ``closer(event)`` on each of ``events``; registering a name again replaces it.

    Parameters
    ----------
    name
        Unique name of what is closed (``"segment-names"``, ``"local-pools"`` ...).
    closer
        Called with the event's name; exceptions it raises are swallowed
        (a shutdown must get to its end).
    order
        Closers run lowest first: freeing names (instant, always safe) comes
        before stopping processes, which comes before reaping their helpers.
    events
        A subset of :data:`EVENTS`.
    """
    events = frozenset(events)
    if not events <= EVENTS:
        raise ValueError(f"unknown lifecycle events {sorted(events - EVENTS)}")
    with _lock:
        _closers[name] = _Entry(order, name, closer, events)


def run(event: str) -> None:
    """Run every closer registered for ``event``, in order."""
    if event not in EVENTS:
        raise ValueError(f"unknown lifecycle event {event!r}")
    with _lock:
        entries = sorted((e for e in _closers.values() if event in e.events), key=lambda e: e.order)
    for entry in entries:
        with contextlib.suppress(Exception):
            entry.closer(event)


def registered() -> list[tuple[str, int, frozenset[str]]]:
    """(name, order, events) of every closer, for tests and ``%shm_status``."""
    with _lock:
        return sorted(((e.name, e.order, e.events) for e in _closers.values()), key=lambda t: t[1])


def hook_kernel_shutdown() -> None:
    """Run the ``kernel-shutdown`` closers first when this kernel shuts down.

    Called by whatever starts processes (a pool, a cluster) and by the
    extension; a no-op outside a kernel and when already hooked. ipykernel
    calls ``do_shutdown`` *before* it kills its children, so wrapping it is
    the one place where stopping them cleanly is still possible.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or not hasattr(kernel, "do_shutdown"):
        return
    with _lock:
        if id(kernel) in _hooked:
            return
        original = kernel.do_shutdown

        def do_shutdown(restart: bool) -> Any:
            run(KERNEL_SHUTDOWN)
            return original(restart)

        do_shutdown.__shm_kernel_safe_original__ = original  # type: ignore[attr-defined]
        kernel.do_shutdown = do_shutdown
        _hooked[id(kernel)] = kernel


def unhook_kernel_shutdown() -> None:
    """Restore every kernel's own ``do_shutdown``."""
    with _lock:
        for kernel in _hooked.values():
            if "do_shutdown" in vars(kernel):
                del kernel.do_shutdown
        _hooked.clear()


atexit.register(run, EXIT)
