"""Ordinary arrays shared once, and reused while they are unchanged.

A call that finds an ordinary (not shared-memory) array in its payload
copies it into a read-only segment. Users run the same cell again and
again with the same ``x``, so that copy (~1.3 s for 1.28 GB into fresh
shared memory) would be paid on every call. The cache keeps the copy for
the next call, tied to the caller's array *object*:

* **Reused only while unchanged.** Each call hashes the caller's array
  (:mod:`.digest`, XXH3-128, ~160 ms per 1.28 GB here, about 5% of the
  copy it saves) and compares with the digest of the shared copy; any
  changed byte (in place, through a view, through another name) gives a
  different digest and a fresh copy. Shape, strides, dtype and data
  address are compared too.
* **A consistent snapshot.** The digest is computed from the shared copy
  itself, after copying, so it describes exactly what workers read, even if
  another thread wrote into the array during the copy. A copy is never
  written after it is made: a changed array gets a new segment, and the old
  one stays mapped and named until the runs that use it have ended
  (leases).
* **Freed with the array.** A weak reference to the caller's array drops
  the copy when the array is collected; ``%unload_ext``, kernel shutdown
  and interpreter exit drop all of them (:mod:`shm_kernel_safe.lifecycle`).
  Workers keep a mapping until their next call, as for every segment.
* **Bounded.** At most :func:`limit` bytes are cached (default: half the
  shared-memory filesystem), least recently used first out; a copy
  that would leave less than a quarter of the filesystem free evicts older
  ones first, and a copy that cannot be cached is made for the call alone
  and freed after it. When creating any copy fails for lack of space, the cache is
  emptied and the copy tried once more: the cache never causes an error
  that would not happen without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from .. import _checks, _platform, lifecycle
from ..errors import SharedMemoryCapacityError
from . import capacity
from .arrays import SharedArray, label, share
from .digest import digest
from .segments import unlink_name

#: Environment variable that sets the cap in bytes (``0`` turns the cache off).
LIMIT_ENV = "SHM_KERNEL_SAFE_SHARE_CACHE_BYTES"
#: Fraction of the shared-memory filesystem cached at most by default.
DEFAULT_FRACTION = 0.5
#: Fraction of the shared-memory filesystem a new cached copy must leave free.
FREE_RESERVE_FRACTION = 0.25


def _meta(arr: np.ndarray) -> tuple:
    return (
        arr.__array_interface__["data"][0],
        arr.shape,
        arr.strides,
        arr.dtype.str if not arr.dtype.fields else arr.dtype.descr,
    )


@dataclass(eq=False)
class _Entry:
    key: int  # id() of the caller's array
    ref: weakref.ref | None  # to the caller's array
    meta: tuple
    handle: SharedArray  # read-only; its local view keeps the mapping alive
    digest: bytes
    nbytes: int
    leases: int = 0  # runs using the copy now
    alive: bool = True  # still the cached copy of a live array
    uses: int = 0  # calls served, the first included
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Lease:
    """One run's use of a shared copy; give it back with :meth:`ShareCache.release`."""

    handle: SharedArray
    #: Bytes copied to get it (0 when the cached copy was reused).
    copied_bytes: int
    #: Whether the copy belongs to the run alone (not cached): unlinked at release.
    owned: bool
    _entry: _Entry | None = None


class ShareCache:
    """Read-only shared copies of ordinary arrays, reused while unchanged."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._lock = threading.RLock()
        self._entries: dict[int, _Entry] = {}  # id(array) -> its current copy
        self._max_bytes = max_bytes

    # -- configuration ---------------------------------------------------------
    def limit(self, max_bytes: int | None = None) -> int:
        """The cap on cached bytes; with ``max_bytes``, set it first.

        Parameters
        ----------
        max_bytes : int, optional
            New cap; 0 turns the cache off (every call copies its inputs anew).
            Copies over a lowered cap are dropped at once.

        Returns
        -------
        int
            The cap in force.
        """
        if max_bytes is not None:
            max_bytes = _checks.count("max_bytes", max_bytes, minimum=0, optional=False)
            with self._lock:
                self._max_bytes = max_bytes
                self._evict(0)
        if self._max_bytes is not None:
            return self._max_bytes
        env = os.environ.get(LIMIT_ENV)
        if env is not None and env.strip().isdigit():
            return int(env)
        return int(DEFAULT_FRACTION * _shm_size())

    # -- use -------------------------------------------------------------------
    def acquire(self, arr: np.ndarray) -> Lease:
        """A read-only shared copy of ``arr`` for one run.

        The cached copy when ``arr`` is the same object with the same bytes
        as when it was copied; else a new copy (cached when the cap allows).
        """
        meta = _meta(arr)
        with self._lock:
            entry = self._entries.get(id(arr))
            if entry is not None and (entry.ref() is not arr or entry.meta != meta):
                self._drop(entry)
                entry = None
            if entry is not None:
                entry.leases += 1  # pinned while we hash, outside the lock
        if entry is not None:
            same = False
            try:
                same = digest(arr) == entry.digest
            finally:
                if not same:  # changed: the stale copy goes before a new one is made
                    self._give_back(entry)
                    self._drop(entry)
            if same:
                with self._lock:
                    entry.uses += 1
                    entry.last_used = time.monotonic()
                return Lease(entry.handle, 0, owned=False, _entry=entry)
        return self._copy(arr, meta)

    def release(self, lease: Lease) -> None:
        """A run no longer uses ``lease``'s copy."""
        if lease.owned:
            with contextlib.suppress(OSError):
                unlink_name(lease.handle.name)
        elif lease._entry is not None:
            self._give_back(lease._entry)

    def clear(self, event: str = "") -> None:
        """Drop every cached copy (copies in use go when their runs end)."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._drop(entry)

    def summary(self) -> list[dict]:
        """One dict per cached copy: segment name, shape, dtype, bytes, uses, in use."""
        with self._lock:
            return [
                {
                    "name": e.handle.name,
                    "shape": e.handle.shape,
                    "dtype": str(e.handle.dtype),
                    "nbytes": e.nbytes,
                    "uses": e.uses,
                    "in_use": e.leases > 0,
                }
                for e in self._entries.values()
            ]

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    # -- internals ---------------------------------------------------------------
    def _copy(self, arr: np.ndarray, meta: tuple) -> Lease:
        nbytes = int(arr.nbytes)
        cap = self.limit()
        cacheable = 0 < nbytes <= cap
        if cacheable:
            with self._lock:
                self._evict(nbytes)
                cacheable = self.cached_bytes() + nbytes <= cap
        try:
            handle = share(arr).as_readonly()
        except SharedMemoryCapacityError:
            self.clear()  # the cache must never cause a failure: retry without it
            handle = share(arr).as_readonly()
        if not cacheable:
            return Lease(handle, nbytes, owned=True)
        # The digest of the copy, not of ``arr``: it describes exactly what
        # workers will read, even if ``arr`` changed while it was copied.
        entry = _Entry(id(arr), None, meta, handle, digest(handle.view()), nbytes, 1, uses=1)
        entry.ref = weakref.ref(arr, self._collected)
        label(handle.view(), f"cached copy {handle.shape} {handle.dtype}")
        with self._lock:
            old = self._entries.get(id(arr))
            if old is not None:
                self._drop(old)
            self._entries[id(arr)] = entry
        return Lease(handle, nbytes, owned=False, _entry=entry)

    def _collected(self, ref: weakref.ref) -> None:
        # The caller's array is gone: so is its copy (a weakref callback; it
        # may run in any thread, at any allocation).
        with self._lock:
            for entry in [e for e in self._entries.values() if e.ref is ref]:
                self._drop(entry)

    def _evict(self, incoming: int) -> None:
        """Drop least recently used copies not in use until ``incoming`` more
        bytes fit under the cap and leave the filesystem its reserve."""
        cap = self.limit()
        total_size = _shm_size()
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            free = capacity.free_bytes()
            over_cap = self.cached_bytes() + incoming > cap
            short = (
                free is not None
                and total_size > 0
                and free - incoming < FREE_RESERVE_FRACTION * total_size
            )
            if not (over_cap or short):
                return
            if entry.leases == 0:
                self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        """``entry`` is no longer the cached copy; its segment goes when unused."""
        with self._lock:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            entry.alive = False
            if entry.leases == 0:
                self._unlink(entry)

    def _give_back(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            if entry.leases == 0 and not entry.alive:
                self._unlink(entry)

    @staticmethod
    def _unlink(entry: _Entry) -> None:
        with contextlib.suppress(OSError):
            unlink_name(entry.handle.name)
        # Forget our view of the copy: its mapping (and so its memory) goes
        # with the last view anywhere, not with this entry object.
        h = entry.handle
        entry.handle = SharedArray(
            h.name, h.segment_nbytes, h.shape, h.dtype, h.offset, h.strides, False
        )
        entry.ref = None


def _shm_size() -> int:
    """Size of the shared-memory filesystem (physical memory where there is none)."""
    directory = _platform.shm_directory()
    if directory and os.path.isdir(directory):
        stat = os.statvfs(directory)
        return stat.f_blocks * stat.f_frsize
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover - psutil is a dependency
        return 1 << 30


#: The process's cache, used by the sharing pickler for every call.
cache = ShareCache()

# Drop the copies before segment names are freed wholesale (order 10) and
# before pools stop: the cache's own unlinks then find their names.
lifecycle.register("share-cache", cache.clear, order=5)
