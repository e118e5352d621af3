"""Remove segments left in /dev/shm by dead processes of this user.

A kernel killed by the OOM killer or a segfault runs no atexit handler, and
its segments stay in ``/dev/shm`` until reboot. Names carry the owner's pid
(see ``naming``), so we can tell leftovers from live segments without any
registry file. We only ever remove a segment when all of these hold: the name
is ours (prefix + this user's tag), the file is owned by this uid, and no
process with that pid is alive. A recycled pid makes us keep a dead segment,
never remove a live one.

Journals of runs that never finished (see ``engine/journal.py``) stay in
the per-user cache folder until their run finishes; the janitor removes
those older than :data:`JOURNAL_MAX_AGE_DAYS` that no running call holds
(when a journal is first opened in a process, and on ``cleanup``).

The same holds for the named semaphores of loky, which runs our pools:
``sem.loky-<pid>-<random>``, made by the process that owns a pool. A pool's
owner killed outright leaves them until its resource tracker, once every
worker is gone, unlinks them; a tracker killed too never does. Unlinking a
name never disturbs a process that has the semaphore open.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass

from .. import _checks
from .._platform import current_user_tag, journal_directory, pid_alive, shm_directory
from . import naming

#: loky's named semaphores in /dev/shm: ``sem.`` + ``/loky-<pid>-<random>``,
#: the random part from ``tempfile``'s name sequence (letters, digits, ``_``).
_LOKY_SEMAPHORE = re.compile(r"sem\.loky-(\d+)-\w+")


def _owner_pid(name: str, tag: str) -> int | None:
    """The pid in a name this janitor may clean, or None for any other name."""
    parsed = naming.parse_name(name)
    if parsed is not None:
        return parsed.pid if parsed.user_tag == tag else None
    match = _LOKY_SEMAPHORE.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class StaleSegment:
    """A segment of this user whose owner process is gone.

    Attributes
    ----------
    name : str
        Its name in the shared-memory directory (``/dev/shm`` on Linux).
    nbytes : int
        Its size.
    owner_pid : int
        The process that made it, no longer alive.
    """

    name: str
    nbytes: int
    owner_pid: int


def find_stale(directory: str | None = None) -> list[StaleSegment]:
    """Segments of this user whose owner process is gone.

    A kernel killed by the OOM killer or a segfault runs no clean-up, and its
    segments stay until reboot. A segment is stale only when its name is
    this package's, with this user's tag, the file is this user's, and the
    pid in its name is not alive. loky's named semaphores of dead processes
    (``sem.loky-<pid>-<n>``, of this user) are listed too.

    Parameters
    ----------
    directory : str, optional
        Where to look (default: the platform's, ``/dev/shm`` on Linux).

    Returns
    -------
    list of StaleSegment
        Sorted by name; empty where the platform has no such directory.

    See Also
    --------
    cleanup_stale

    Examples
    --------
    >>> import tempfile
    >>> import shm_kernel_safe as sks
    >>> sks.find_stale(tempfile.mkdtemp())  # an empty directory
    []
    """
    _checks.path("directory", directory)
    directory = shm_directory() if directory is None else directory
    if directory is None or not os.path.isdir(directory):
        return []
    tag = current_user_tag()
    uid = os.getuid() if hasattr(os, "getuid") else None
    stale = []
    for entry in os.scandir(directory):
        pid = _owner_pid(entry.name, tag)
        if pid is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if uid is not None and info.st_uid != uid:
            continue
        if pid_alive(pid):
            continue
        stale.append(StaleSegment(entry.name, info.st_size, pid))
    return sorted(stale, key=lambda s: s.name)


def cleanup_stale(directory: str | None = None) -> list[StaleSegment]:
    """Unlink stale segments of this user; return what was removed.

    ``%shm_cleanup`` and ``python -m shm_kernel_safe cleanup`` call it. It
    removes only what :func:`find_stale` lists: never a live process's
    segment, never another user's.

    Parameters
    ----------
    directory : str, optional
        Where to look (default: the platform's, ``/dev/shm`` on Linux).

    Returns
    -------
    list of StaleSegment
        The segments removed.

    Examples
    --------
    >>> import tempfile
    >>> import shm_kernel_safe as sks
    >>> sks.cleanup_stale(tempfile.mkdtemp())
    []
    """
    directory = shm_directory() if directory is None else directory
    removed = []
    for seg in find_stale(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, seg.name))  # type: ignore[arg-type]
            removed.append(seg)
    return removed


#: File name suffix of journals.
JOURNAL_SUFFIX = ".sksj"
#: Journals in the default folder older than this (days) are removed.
JOURNAL_MAX_AGE_DAYS = 14
#: Journals a run of this process holds (its POSIX lock does not conflict
#: with this process's own, and closing any descriptor would drop it).
held_journals: set[str] = set()


def in_use(path: str) -> bool:
    """Whether a running call (of this process or another) holds the journal at ``path``."""
    if os.path.abspath(path) in held_journals:
        return True
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove_old_journals(
    directory: str | None = None, max_age_days: float = JOURNAL_MAX_AGE_DAYS
) -> list[str]:
    """Remove journals older than ``max_age_days`` that no running call holds.

    Parameters
    ----------
    directory : str, optional
        Where to look (default: the per-user cache folder's ``journals``).
    max_age_days : float
        Age, since the journal was last written, above which it goes.

    Returns
    -------
    list of str
        The paths removed.
    """
    directory = journal_directory() if directory is None else directory
    if not os.path.isdir(directory):
        return []
    removed = []
    limit = time.time() - max_age_days * 86400
    for entry in os.scandir(directory):
        if not (entry.name.endswith(JOURNAL_SUFFIX) or entry.name.startswith(".sksj-")):
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < limit and not in_use(entry.path):
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed
