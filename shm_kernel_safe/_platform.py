"""Platform rules for shared memory, each behind a small named function.

Only Linux runs in this project's CI, so every rule that differs on Windows or
macOS is a pure function of its inputs (the platform is a parameter with the
running one as default). The unit tests exercise every branch's logic on
Linux; the branches that call OS APIs are kept as thin as possible.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

#: POSIX shared-memory names on macOS are limited to 31 bytes including the
#: leading slash (PSHMNAMLEN); we keep every platform under it so a name made
#: on one machine is legal on all.
MAX_NAME_CHARS = 30


def is_windows(platform: str = sys.platform) -> bool:
    return platform.startswith("win")


def shm_directory(platform: str = sys.platform) -> str | None:
    """The directory that mirrors POSIX shared memory, if the OS has one.

    Linux exposes segments as files in ``/dev/shm`` (which is what makes
    capacity checks and the stale-segment janitor possible); macOS and
    Windows keep them in kernel objects with no listing.
    """
    if platform.startswith("linux"):
        return "/dev/shm"
    return None


def mapping_size(nbytes: int) -> int:
    """Bytes to map for an array of ``nbytes``: mmap refuses length 0."""
    return max(int(nbytes), 1)


def unlink_frees_name(platform: str = sys.platform) -> bool:
    """Whether a segment has a name that outlives its handles until unlinked.

    POSIX: yes, and unlinking early is legal (memory lives while mapped).
    Windows: no; the named mapping dies with the last handle, so there is
    nothing to unlink, and the creator must keep its handle open until every
    worker has attached (the parent holds every segment of a run until the
    run ends). Windows and macOS round a mapping's size up to whole pages,
    so handles always carry exact byte counts, never the mapping's size.
    """
    return not is_windows(platform)


def default_start_method(platform: str = sys.platform) -> str:
    """The safest start method that works in a multi-threaded kernel.

    ``fork`` in a kernel with live threads (ipykernel's IOPub and heartbeat,
    Spyder's comm thread) can deadlock children; Python 3.12+ warns about it.
    On Linux a forkserver is safe and starts workers fastest; Windows has only
    spawn; on macOS spawn is the platform default since 3.8.
    """
    if platform.startswith("linux"):
        return "forkserver"
    return "spawn"


def available_start_methods(platform: str = sys.platform) -> tuple[str, ...]:
    if is_windows(platform):
        return ("spawn",)
    return ("spawn", "forkserver", "fork")


def current_user_tag(platform: str = sys.platform) -> str:
    """A short tag naming this user in segment names (base-36 uid on POSIX)."""
    if hasattr(os, "getuid") and not is_windows(platform):
        return to_base36(os.getuid())
    import getpass
    import zlib

    return to_base36(zlib.crc32(getpass.getuser().encode()) & 0xFFFFFF)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie.

    psutil rather than ``os.kill(pid, 0)``: it works on Windows too, and it
    reports our own unreaped dead children (zombies) as dead, which they are.
    """
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def to_base36(value: int) -> str:
    if value < 0:
        raise ValueError("negative value")
    if value == 0:
        return "0"
    out = []
    while value:
        value, rem = divmod(value, 36)
        out.append(_DIGITS[rem])
    return "".join(reversed(out))


def journal_directory() -> str:
    """Where journals live unless a path is given: the per-user cache folder
    (``~/.cache/shm_kernel_safe/journals`` on Linux, ``~/Library/Caches`` on
    macOS, ``%LOCALAPPDATA%`` on Windows, as ``platformdirs`` knows them)."""
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("shm_kernel_safe", appauthor=False), "journals")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def interrupt_deferred() -> Iterator[None]:
    """Hold a SIGINT that arrives in the block, and deliver it when the block
    ends, to the handler that was in place.

    For what an interrupt would leave half done in this process: a pool
    halfway started (a process started but recorded nowhere, its semaphores
    unlinked under it), a package halfway imported (``distributed`` then
    lacks attributes for the rest of the process), a cluster halfway up (its
    processes owned by nobody). Each is short and bounded; the interrupt is
    raised right after it. Only in the main thread (where Python runs signal
    handlers) and when SIGINT has a Python handler; elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL: nothing raises here
        yield
        return
    caught: list[Any] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    except ValueError:  # a subinterpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        previous(signal.SIGINT, caught[0])
