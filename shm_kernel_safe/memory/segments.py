"""Create, attach, close and unlink shared-memory segments safely.

This is the one place that maps and unmaps shared memory, and it keeps the
package's core invariant: *memory is unmapped only when no Python object can
reach it.* ``close()`` never calls ``mmap.close()``; it drops this object's
references and lets reference counting unmap when the last view dies.
``unlink()`` frees the name at once (POSIX), which is always legal.

We map segments ourselves instead of going through
``multiprocessing.shared_memory.SharedMemory`` for three reasons:

* attaching must not register with the resource_tracker (``track=False``
  exists only from 3.13; before it every attaching process registers the
  name, and its tracker warns about "leaked" segments or unlinks them early);
* every array we hand out is built on a ``frombuffer`` root that holds a
  buffer export on the mmap, so even a stray ``mmap.close()`` from third-party
  code raises ``BufferError`` instead of unmapping under live views;
* creation checks and reserves capacity before the first write.

Ownership is tracked by weak references only: a segment the user holds
through arrays stays mapped and named; when its last view dies, its name is
unlinked by a finalizer (in the creating process only, never a forked child).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from .. import _platform, lifecycle
from ..errors import SegmentNotFoundError
from . import capacity, naming

try:  # POSIX: CPython's own binding of shm_open/shm_unlink
    import _posixshmem
except ImportError:  # Windows
    _posixshmem = None

_O_CREX = os.O_CREAT | os.O_EXCL | os.O_RDWR


@dataclass
class SegmentRecord:
    """What the registry knows of a segment this process created."""

    name: str
    nbytes: int
    owner_pid: int
    created: float
    mapping: weakref.ref  # to the mmap.mmap; dead once every view is gone
    description: str = ""
    unlinked: bool = False

    @property
    def views_alive(self) -> bool:
        return self.mapping() is not None


_registry_lock = threading.RLock()
_registry: dict[str, SegmentRecord] = {}
_mapping_ids: dict[int, str] = {}  # id(mmap) -> name, for segment_name_of_mapping()


class Segment:
    """A mapping of one named shared-memory segment.

    ``root`` is a uint8 ndarray over the whole mapping; every array view is
    built from it, so each view keeps the mapping alive by reference.
    """

    __slots__ = ("__weakref__", "_mmap", "_root", "name", "nbytes", "owner")

    def __init__(self, name: str, nbytes: int, mapping: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.nbytes = int(nbytes)
        self.owner = owner
        self._mmap: mmap.mmap | None = mapping
        self._root: np.ndarray | None = np.frombuffer(mapping, dtype=np.uint8, count=self.nbytes)

    # -- construction -----------------------------------------------------
    @classmethod
    def create(cls, nbytes: int, description: str = "", data: memoryview | None = None) -> Segment:
        """A new segment of ``nbytes``, its pages reserved (or an error now).

        ``data`` (``nbytes`` bytes) is its first content, written by the
        kernel where it can (see ``capacity.write_all``).
        """
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"segment size must be >= 0, got {nbytes}")
        capacity.check_capacity(nbytes)
        # From the moment the name may exist until it is registered (where
        # exit and kernel shutdown find it), an asynchronous exception (the
        # KeyboardInterrupt of "Interrupt kernel") would leak it in /dev/shm:
        # the whole span is one try, and ``created`` is set before the call
        # that makes the name (a store is no point where a signal is raised).
        created = None
        try:
            for _ in range(16):
                created = naming.new_name()
                try:
                    mapping = _create_mapping(created, nbytes, data)
                except FileExistsError:
                    created = None  # someone else's name: never unlinked here
                    continue
                break
            else:  # pragma: no cover - 64 random bits collided 16 times
                raise FileExistsError("could not find a free shared-memory name")
            seg = cls(created, nbytes, mapping, owner=True)
            _register(seg, mapping, description)
        except BaseException:
            if created is not None:
                with contextlib.suppress(OSError):
                    unlink_name(created)
            raise
        return seg

    @classmethod
    def attach(cls, name: str, nbytes: int) -> Segment:
        """Map an existing segment without registering it anywhere."""
        return cls(name, nbytes, _attach_mapping(name, nbytes), owner=False)

    # -- access -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._root is None

    @property
    def root(self) -> np.ndarray:
        if self._root is None:
            raise ValueError(f"segment {self.name} is closed in this object")
        return self._root

    # -- teardown -----------------------------------------------------------
    def close(self) -> None:
        """Drop this object's references; memory lives as long as its views."""
        self._root = None
        self._mmap = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        role = "owner" if self.owner else "attached"
        return f"<Segment {self.name} {self.nbytes} bytes {role} {state}>"


# -- OS-specific mapping ------------------------------------------------------
def _create_mapping(name: str, nbytes: int, data: memoryview | None = None) -> mmap.mmap:
    size = _platform.mapping_size(nbytes)
    if _posixshmem is None:
        mapping = _windows_create(name, size)
        if data is not None:
            mapping[: len(data)] = data
        return mapping
    fd = _posixshmem.shm_open("/" + name, _O_CREX, mode=0o600)
    try:
        os.ftruncate(fd, size)
        if data is not None and len(data) == size:
            capacity.write_all(fd, data)
        else:  # no content, or none at all (an empty array maps one byte)
            capacity.reserve(fd, size)
        return _advised(mmap.mmap(fd, size))
    except BaseException:
        with contextlib.suppress(OSError):
            _posixshmem.shm_unlink("/" + name)
        raise
    finally:
        os.close(fd)


def _attach_mapping(name: str, nbytes: int) -> mmap.mmap:
    size = _platform.mapping_size(nbytes)
    if _posixshmem is None:
        return _windows_attach(name, size)
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError as exc:
        raise SegmentNotFoundError(
            f"shared-memory segment {name!r} does not exist (unlinked, or its owner died)"
        ) from exc
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise ValueError(f"segment {name} holds {actual} bytes, handle says {size}")
        return _advised(mmap.mmap(fd, size))
    finally:
        os.close(fd)


_HUGE_PAGE_MIN = 4 << 20


def _advised(mapping: mmap.mmap) -> mmap.mmap:
    """Ask for transparent huge pages on big mappings.

    numpy gets 2 MiB pages for its own big arrays (it madvises them); shared
    memory gets 4 KiB pages unless asked, and a task reading a large block
    then spends a few percent in TLB misses. Effective where the kernel
    allows it for shmem (``/sys/kernel/mm/transparent_hugepage/shmem_enabled``
    = advise, within_size or always); a harmless no-op elsewhere.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and len(mapping) >= _HUGE_PAGE_MIN:
        with contextlib.suppress(OSError):
            mapping.madvise(advice)
    return mapping


def _windows_create(name: str, size: int) -> mmap.mmap:  # pragma: no cover - Windows
    import _winapi

    handle = _winapi.CreateFileMapping(
        _winapi.INVALID_HANDLE_VALUE,
        _winapi.NULL,
        _winapi.PAGE_READWRITE,
        (size >> 32) & 0xFFFFFFFF,
        size & 0xFFFFFFFF,
        name,
    )
    try:
        if _winapi.GetLastError() == _winapi.ERROR_ALREADY_EXISTS:
            raise FileExistsError(name)
        return mmap.mmap(-1, size, tagname=name)
    finally:
        _winapi.CloseHandle(handle)


def _windows_attach(name: str, size: int) -> mmap.mmap:  # pragma: no cover - Windows
    import _winapi

    try:
        handle = _winapi.OpenFileMapping(
            _winapi.FILE_MAP_READ | _winapi.FILE_MAP_WRITE, False, name
        )
    except OSError as exc:
        raise SegmentNotFoundError(f"shared-memory segment {name!r} does not exist") from exc
    _winapi.CloseHandle(handle)
    return mmap.mmap(-1, size, tagname=name)


def unlink_name(name: str) -> bool:
    """Remove a segment's name; True if this call removed it."""
    with _registry_lock:
        record = _registry.get(name)
        if record is not None:
            record.unlinked = True
            if record.mapping() is None:
                _forget(name)
    if not _platform.unlink_frees_name() or _posixshmem is None:
        return False  # Windows: the mapping dies with its last handle
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


# -- registry -----------------------------------------------------------------
def _register(seg: Segment, mapping: mmap.mmap, description: str) -> None:
    name, pid = seg.name, os.getpid()
    ref = weakref.ref(mapping)
    record = SegmentRecord(name, seg.nbytes, pid, time.time(), ref, description)
    with _registry_lock:
        _registry[name] = record
        _mapping_ids[id(mapping)] = name
    # When the last view dies, the name goes too: no leak in /dev/shm from a
    # segment the user simply forgot. Only the creating process unlinks.
    weakref.finalize(mapping, _on_mapping_collected, name, id(mapping), pid)


def _on_mapping_collected(name: str, mapping_id: int, owner_pid: int) -> None:
    with _registry_lock:
        if _mapping_ids.get(mapping_id) == name:
            del _mapping_ids[mapping_id]
        record = _registry.get(name)
        was_unlinked = record is None or record.unlinked
        _forget(name)
    if os.getpid() == owner_pid and not was_unlinked:
        with contextlib.suppress(OSError):
            unlink_name(name)


def _forget(name: str) -> None:
    with _registry_lock:
        _registry.pop(name, None)


def describe(name: str, description: str) -> None:
    with _registry_lock:
        if name in _registry:
            _registry[name].description = description


def live_segments() -> list[SegmentRecord]:
    """Segments this process created whose name or memory still exists.

    What ``%shm_status`` lists as "Segments of this kernel".

    Returns
    -------
    list of SegmentRecord
        One record per segment (``name``, ``nbytes``, ``description``,
        ``unlinked``...).

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> y = sks.zeros(1000)
    >>> any(r.nbytes >= y.nbytes for r in sks.live_segments())
    True
    """
    with _registry_lock:
        return [r for r in _registry.values() if r.owner_pid == os.getpid()]


def segment_name_of_mapping(mapping: object) -> str | None:
    """Name of a not-yet-unlinked segment this process created, given its mmap."""
    with _registry_lock:
        name = _mapping_ids.get(id(mapping))
        if name is None:
            return None
        record = _registry.get(name)
        if record is None or record.unlinked or record.mapping() is not mapping:
            return None
        return name


def unlink_all_owned(event: str = lifecycle.EXIT) -> None:
    """At exit, free every name this process still owns (never a parent's)."""
    for record in live_segments():
        if not record.unlinked:
            with contextlib.suppress(OSError):
                unlink_name(record.name)


# Freeing names is instant and always safe: first, before processes stop.
lifecycle.register(
    "segment-names", unlink_all_owned, order=10, events={lifecycle.EXIT, lifecycle.KERNEL_SHUTDOWN}
)
