"""Say why parallel did not pay, once, from numbers the run has anyway.

After the probe (the first item, timed in the worker) the run knows what
one item costs and what it paid before that item came back: encoding and
copying the inputs, starting or waking the workers, one message each way.
When all the items would have taken less in the calling process than those
fixed costs, the user gets one :class:`~shm_kernel_safe.errors.PerformanceHint`
with both numbers and the remedies, instead of a silent ``0.75x``.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import PerformanceHint
from .worker_warnings import CELL_FILE_PREFIX

#: Fixed costs below this are a warm pool's round trip on a busy machine, too
#: short for anyone to notice: never worth a warning.
QUIET_BELOW = 0.1


def hint_text(n_items: int, item_seconds: float, fixed_seconds: float) -> str | None:
    """The hint's line, or None when the items are worth their workers."""
    in_process = n_items * item_seconds
    if fixed_seconds < QUIET_BELOW or in_process >= fixed_seconds:
        return None
    return (
        f"{n_items} items of ~{_fmt(item_seconds)} each would take ~{_fmt(in_process)} "
        f"in this process, less than the {_fmt(fixed_seconds)} this call spent starting "
        f"workers and sending them the inputs: give each item more work (fewer, bigger "
        f"items), move big inputs to shared memory once (%shm_share x or "
        f"x = shm_kernel_safe.share(x)), and start the pool ahead with "
        f"shm_kernel_safe.prestart()"
    )


def warn_if_not_worth_it(
    fn: Any, n_items: int, item_seconds: float, fixed_seconds: float, stacklevel: int
) -> None:
    """Issue the hint for a run of ``fn`` when :func:`hint_text` has one.

    It points at the caller's line; for a ``%%shm_parallel`` cell, at the
    cell (the magic's own line would mean nothing to its user).
    """
    text = hint_text(n_items, item_seconds, fixed_seconds)
    if text is None:
        return
    code = getattr(fn, "__code__", None)
    if code is not None and code.co_filename.startswith(CELL_FILE_PREFIX):
        warnings.warn_explicit(
            PerformanceHint(text), PerformanceHint, code.co_filename, 1, module="__main__"
        )
    else:
        warnings.warn(PerformanceHint(text), stacklevel=stacklevel + 1)


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.1f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds * 1e6:.0f} us"
