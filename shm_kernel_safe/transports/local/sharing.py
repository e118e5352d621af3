"""The local transport's payload: pickled once, big arrays moved to shared memory.

Built on the engine's :class:`~shm_kernel_safe.engine.pickling.ArrayPickler`:
any ndarray above a size threshold, found anywhere in the payload (closures,
globals the function uses, defaults, items), is replaced by a small
:class:`~shm_kernel_safe.memory.arrays.SharedArray`:

* an array that already lives in one of our segments travels as a handle
  with no copy (writable in workers if it is writable here);
* any other big array is copied into a read-only segment that the share
  cache (:mod:`~shm_kernel_safe.memory.share_cache`) keeps for later calls
  while the caller's array object lives with the same bytes: the next call
  hashes the array and, unchanged, copies nothing.

Workers rebuild the arrays as views of segments they map once and keep.
"""

from __future__ import annotations

import io
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...engine.pickling import DEFAULT_THRESHOLD, ArrayPickler
from ...memory.arrays import SharedArray
from ...memory.share_cache import Lease
from ...memory.share_cache import cache as share_cache


@dataclass
class SharingReport:
    """What pickling a payload did, for cleanup and for the benchmarks."""

    reused: list[SharedArray] = field(default_factory=list)  # already in segments
    copied_bytes: int = 0  # copied into shared memory by this call
    leases: list[Lease] = field(default_factory=list)  # copies from the share cache
    cached_bytes: int = 0  # ordinary arrays served by an unchanged cached copy


class _SharingPickler(ArrayPickler):
    def __init__(
        self,
        file: io.BytesIO,
        threshold: int,
        force: set[int],
        report: SharingReport,
        replace: dict[int, SharedArray],
        before_copy: Callable[[], Any] | None = None,
    ):
        super().__init__(file)
        self._before_copy = before_copy
        self._threshold = threshold
        self._force = force
        self._report = report
        self._replace = replace
        self._by_data: dict[tuple, SharedArray] = {}

    def reduce_array(self, arr: np.ndarray | None, handle: SharedArray | None) -> tuple | None:
        handle = self._handle_for(arr, handle)
        return None if handle is None else (_rebuild_array, _fields(handle))

    def _handle_for(
        self, arr: np.ndarray | None, existing: SharedArray | None
    ) -> SharedArray | None:
        if arr is not None and id(arr) in self._replace:  # an output: a writable shared copy
            return self._replace[id(arr)]
        if existing is not None:
            self._report.reused.append(existing)
            return existing
        assert arr is not None
        if arr.nbytes < self._threshold and id(arr) not in self._force:
            return None
        key = (arr.__array_interface__["data"][0], arr.shape, arr.strides, arr.dtype.str)
        handle = self._by_data.get(key)
        if handle is None:
            if self._before_copy is not None:
                self._before_copy()  # e.g. start workers while we copy
                self._before_copy = None
            lease = share_cache.acquire(arr)
            handle = lease.handle
            self._by_data[key] = handle
            self._report.leases.append(lease)
            self._report.copied_bytes += lease.copied_bytes
            self._report.cached_bytes += arr.nbytes - lease.copied_bytes
        return handle


def dumps(
    obj: Any,
    threshold: int = DEFAULT_THRESHOLD,
    force: tuple[Any, ...] = (),
    replace: dict[int, SharedArray] | None = None,
    before_copy: Callable[[], Any] | None = None,
) -> tuple[bytes, SharingReport]:
    """Pickle ``obj`` for workers; big arrays go to shared memory.

    ``force`` lists arrays to share whatever their size; ``replace`` maps
    ``id(array)`` to the handle workers get instead (output arrays);
    ``before_copy`` is called once, before the first array that is not
    already in shared memory is checked or copied. On error, segments
    already created for this payload are released.
    """
    report = SharingReport()
    buf = io.BytesIO()
    try:
        pickler = _SharingPickler(
            buf, threshold, {id(a) for a in force}, report, replace or {}, before_copy
        )
        pickler.dump(obj)
    except BaseException:
        release(report)
        raise
    return buf.getvalue(), report


def release(report: SharingReport) -> None:
    """Give back the payload's shared copies: copies made for this call alone
    are unlinked, cached ones stay for the next call; views elsewhere live on."""
    for lease in report.leases:
        share_cache.release(lease)
    report.leases.clear()


# -- worker side ----------------------------------------------------------------
_touched = threading.local()


def _fields(handle: SharedArray) -> tuple:
    # Plain values only: a SharedArray here would be reduced again, forever.
    return (
        handle.name,
        handle.segment_nbytes,
        handle.shape,
        handle.dtype.str if not handle.dtype.fields else handle.dtype,
        handle.offset,
        handle.strides,
        handle.writable,
    )


def _rebuild_array(*fields: Any) -> np.ndarray:
    handle = SharedArray(*fields)
    names = getattr(_touched, "names", None)
    if names is not None:
        names.add(handle.name)
    return handle.view()


def loads(data: bytes | memoryview) -> tuple[Any, set[str]]:
    """Unpickle a payload; also return the segment names it attached."""
    _touched.names = set()
    try:
        obj = pickle.loads(data)
        return obj, _touched.names
    finally:
        _touched.names = None
