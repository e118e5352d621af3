"""Remove segments left in /dev/shm by dead processes of this user.

A kernel killed by the OOM killer or a segfault runs no atexit handler, and
its segments stay in ``/dev/shm`` until reboot. Names carry the owner's pid
(see ``naming``), so we can tell leftovers from live segments without any
registry file. We only ever remove a segment when all of these hold: the name
is ours (prefix + this user's tag), the file is owned by this uid, and no
process with that pid is alive. A recycled pid makes us keep a dead segment,
never remove a live one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from .._platform import current_user_tag, pid_alive, shm_directory
from . import naming


@dataclass(frozen=True)
class StaleSegment:
    name: str
    nbytes: int
    owner_pid: int


def find_stale(directory: str | None = None) -> list[StaleSegment]:
    """Segments of this user whose owner process is gone."""
    directory = shm_directory() if directory is None else directory
    if directory is None or not os.path.isdir(directory):
        return []
    tag = current_user_tag()
    uid = os.getuid() if hasattr(os, "getuid") else None
    stale = []
    for entry in os.scandir(directory):
        parsed = naming.parse_name(entry.name)
        if parsed is None or parsed.user_tag != tag:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if uid is not None and info.st_uid != uid:
            continue
        if pid_alive(parsed.pid):
            continue
        stale.append(StaleSegment(entry.name, info.st_size, parsed.pid))
    return sorted(stale, key=lambda s: s.name)


def cleanup_stale(directory: str | None = None) -> list[StaleSegment]:
    """Unlink stale segments of this user; return what was removed."""
    directory = shm_directory() if directory is None else directory
    removed = []
    for seg in find_stale(directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, seg.name))  # type: ignore[arg-type]
            removed.append(seg)
    return removed
