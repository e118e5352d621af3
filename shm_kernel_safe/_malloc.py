"""Start workers in glibc's steady malloc state, not its cold one.

numpy temporaries of a typical task (a few hundred KB to a few MB, e.g.
``np.sqrt(np.abs(x[block]))``) are above glibc's initial mmap threshold
(128 KiB): each one is mmap'ed, page-faulted in, and unmapped again, and a
freed chunk at the top of the heap is trimmed back to the OS. glibc raises
both thresholds by itself once a large mmap'ed chunk is freed (up to 32 MiB
and 64 MiB), which a long-lived kernel has long done, and which forked
workers inherit. Freshly started workers (spawn, forkserver: Windows,
macOS, and our Linux default) have not: measured here, the same 1 ms task
took 1.25 ms in a fresh interpreter and 0.22 ms after this tuning.

So each worker starts where glibc would converge anyway. The cost is that
a worker may keep up to 64 MiB of freed heap instead of returning it.
Set ``SHM_KERNEL_SAFE_MALLOC_TUNING=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's dynamic policy sets with it

TUNED = False


def tune_malloc() -> bool:
    """Put this process in glibc's steady malloc state, as every worker is.

    Sets glibc's mmap threshold to 32 MiB and its trim threshold to 64 MiB,
    where glibc converges by itself once a large chunk is freed. numpy
    temporaries of a few MB are then reused instead of being mapped and
    page-faulted anew each time. Useful before timing a serial loop against
    the workers (which start in this state). Linux with glibc only; set
    ``SHM_KERNEL_SAFE_MALLOC_TUNING=0`` to opt out.

    Returns
    -------
    bool
        True if the thresholds were set; False elsewhere (another OS or
        libc, or opted out).

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> sks.tune_malloc() in (True, False)
    True
    """
    global TUNED
    if os.environ.get("SHM_KERNEL_SAFE_MALLOC_TUNING", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
    TUNED = ok
    return ok
