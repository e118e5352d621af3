"""shm_kernel_safe: big-array multiprocessing that cannot crash your kernel.

The library works without IPython: :func:`share`, :func:`empty`,
:func:`zeros`, :func:`is_dangling`, :func:`protect`, :func:`cleanup_stale`.
``%load_ext shm_kernel_safe`` adds the magics and inspection hooks on top.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CellSyntaxError,
    DanglingArrayError,
    DanglingAttributeError,
    DaskBackendError,
    FailedItems,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    ItemsFailedWarning,
    JournalError,
    JournalWarning,
    ParallelInterrupt,
    ParallelTimeoutError,
    PartialResults,
    PerformanceHint,
    ResumeFunctionChangedWarning,
    RunCancelled,
    RunFailed,
    SegmentNotFoundError,
    SharedMemoryCapacityError,
    ShmKernelSafeError,
    TaskError,
    WorkerDiedError,
)

# The rest of the public names are imported on first use (PEP 562). Every
# worker's start imports this package first (a forkserver preloads the
# worker module, whose package this is): importing the whole API there,
# the engine, journals and background runs it never runs, cost ~80 ms of
# each pool's first start; the worker's own modules are half of them.
_LAZY = {
    "tune_malloc": "._malloc",
    "imap": ".api",
    "last_errors": ".api",
    "parallel_map": ".api",
    "prestart": ".api",
    "status": ".api",
    "RunHandle": ".engine.background",
    "JournalInfo": ".engine.journal",
    "discard_journal": ".engine.journal",
    "journals": ".engine.journal",
    "SharedArray": ".memory.arrays",
    "empty": ".memory.arrays",
    "handle_of": ".memory.arrays",
    "is_dangling": ".memory.arrays",
    "share": ".memory.arrays",
    "zeros": ".memory.arrays",
    "StaleSegment": ".memory.janitor",
    "cleanup_stale": ".memory.janitor",
    "find_stale": ".memory.janitor",
    "live_segments": ".memory.segments",
    "is_protected": ".memory.stdlib_patch",
    "protect": ".memory.stdlib_patch",
    "unprotect": ".memory.stdlib_patch",
    "shutdown_pools": ".transports.local.pool:shutdown_all",
}
_SUBPACKAGES = ("api", "engine", "kernel", "memory", "transports")

if TYPE_CHECKING:  # what the names above are, for type checkers and IDEs
    from ._malloc import tune_malloc
    from .api import imap, last_errors, parallel_map, prestart, status
    from .engine.background import RunHandle
    from .engine.journal import JournalInfo, discard_journal, journals
    from .memory.arrays import SharedArray, empty, handle_of, is_dangling, share, zeros
    from .memory.janitor import StaleSegment, cleanup_stale, find_stale
    from .memory.segments import live_segments
    from .memory.stdlib_patch import is_protected, protect, unprotect
    from .transports.local.pool import shutdown_all as shutdown_pools


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        if name in _SUBPACKAGES:  # ``sks.memory.janitor`` works as after an eager import
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module, __name__), attr or name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"


def share_cache_limit(max_bytes: int | None = None) -> int:
    """Cap, in bytes, on the shared copies kept for arrays passed unshared.

    ``parallel_map`` copies an ordinary big array into shared memory once
    and reuses the copy while the same array object holds the same bytes.

    Parameters
    ----------
    max_bytes : int, optional
        New cap; 0 turns the reuse off (every call copies). Default cap:
        half the shared-memory filesystem, or the environment variable
        ``SHM_KERNEL_SAFE_SHARE_CACHE_BYTES``.

    Returns
    -------
    int
        The cap in force.

    Raises
    ------
    InvalidArgumentError
        ``max_bytes`` is not an integer >= 0 (``InvalidArgumentTypeError``
        for a wrong type).
    """
    from .memory.share_cache import cache

    return cache.limit(max_bytes)


def load_ipython_extension(shell):
    """``%load_ext shm_kernel_safe``: safe close, inspection hooks, magics."""
    from .kernel.extension import load_ipython_extension as load

    load(shell)


def unload_ipython_extension(shell):
    """``%unload_ext shm_kernel_safe``: undo exactly what loading did."""
    from .kernel.extension import unload_ipython_extension as unload

    unload(shell)


__all__ = [
    "CellSyntaxError",
    "DanglingArrayError",
    "DanglingAttributeError",
    "DaskBackendError",
    "FailedItems",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "ItemsFailedWarning",
    "JournalError",
    "JournalInfo",
    "JournalWarning",
    "ParallelInterrupt",
    "ParallelTimeoutError",
    "PartialResults",
    "PerformanceHint",
    "ResumeFunctionChangedWarning",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "SegmentNotFoundError",
    "SharedArray",
    "SharedMemoryCapacityError",
    "ShmKernelSafeError",
    "StaleSegment",
    "TaskError",
    "WorkerDiedError",
    "cleanup_stale",
    "discard_journal",
    "empty",
    "find_stale",
    "handle_of",
    "imap",
    "is_dangling",
    "is_protected",
    "journals",
    "last_errors",
    "live_segments",
    "parallel_map",
    "prestart",
    "protect",
    "share",
    "share_cache_limit",
    "shutdown_pools",
    "status",
    "tune_malloc",
    "unprotect",
    "zeros",
]
