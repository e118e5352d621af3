"""shm_kernel_safe: big-array multiprocessing that cannot crash your kernel.

The library works without IPython: :func:`share`, :func:`empty`,
:func:`zeros`, :func:`is_dangling`, :func:`protect`, :func:`cleanup_stale`.
``%load_ext shm_kernel_safe`` adds the magics and inspection hooks on top.
"""

from __future__ import annotations

from .arrays import SharedArray, empty, handle_of, is_dangling, share, zeros
from .errors import (
    DanglingArrayError,
    SegmentNotFoundError,
    SharedMemoryCapacityError,
    ShmKernelSafeError,
)
from .janitor import StaleSegment, cleanup_stale, find_stale
from .protect import is_protected, protect, unprotect
from .segments import live_segments

__version__ = "0.1.0.dev0"

__all__ = [
    "DanglingArrayError",
    "SegmentNotFoundError",
    "SharedArray",
    "SharedMemoryCapacityError",
    "ShmKernelSafeError",
    "StaleSegment",
    "cleanup_stale",
    "empty",
    "find_stale",
    "handle_of",
    "is_dangling",
    "is_protected",
    "live_segments",
    "protect",
    "share",
    "unprotect",
    "zeros",
]
