"""shm_kernel_safe: big-array multiprocessing that cannot crash your kernel.

The library works without IPython: :func:`share`, :func:`empty`,
:func:`zeros`, :func:`is_dangling`, :func:`protect`, :func:`cleanup_stale`.
``%load_ext shm_kernel_safe`` adds the magics and inspection hooks on top.
"""

from __future__ import annotations

from ._malloc import tune_malloc
from .api import imap, last_errors, parallel_map, prestart, status
from .engine.background import RunHandle
from .engine.journal import JournalInfo, discard_journal, journals
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
from .memory.arrays import SharedArray, empty, handle_of, is_dangling, share, zeros
from .memory.janitor import StaleSegment, cleanup_stale, find_stale
from .memory.segments import live_segments
from .memory.share_cache import cache as _share_cache
from .memory.stdlib_patch import is_protected, protect, unprotect
from .transports.local.pool import shutdown_all as shutdown_pools

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
    return _share_cache.limit(max_bytes)


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
