"""ndarrays that live in shared memory, the handles that name them, and the
test for arrays whose memory was unmapped under them.

A :class:`SharedArray` is what crosses process boundaries: a few dozen bytes
(segment name, exact byte counts, shape, dtype, offset, strides, writability)
that attach to the same memory in another process. Exact byte counts matter
because Windows and macOS round a mapping up to whole pages.

Arrays we build always sit on a ``frombuffer`` root that holds a buffer export
on the mmap, so their memory cannot be unmapped while they live (see
``segments``). Arrays built by other code on stdlib ``SharedMemory.buf`` can
be: :func:`is_dangling` detects that without reading a byte of the array.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from .. import _checks
from ..errors import InvalidArgumentTypeError
from .segments import Segment, describe, segment_name_of_mapping

_CHAIN_LIMIT = 10_000


class SharedArray:
    """A picklable name for an ndarray held in a shared-memory segment.

    In the process that made it, :meth:`view` returns that process's array.
    Anywhere else it attaches (once per process, cached) and returns a view
    that is read-only unless the handle says ``writable``. Made by
    :func:`share` and :func:`handle_of`; pickling it sends only the name,
    shape, dtype, offset and strides (about 200 bytes), never the data.

    Parameters
    ----------
    name : str
        The segment's name (in ``/dev/shm`` on Linux).
    segment_nbytes : int
        The size of the whole segment, in bytes.
    shape : tuple of int
        The array's shape.
    dtype : numpy.dtype or str
        The array's dtype.
    offset : int
        Where the array starts in the segment, in bytes.
    strides : tuple of int
        The array's strides, in bytes.
    writable : bool
        Whether views attached in other processes may be written.

    Examples
    --------
    >>> import pickle
    >>> import numpy as np
    >>> import shm_kernel_safe as sks
    >>> handle = sks.share(np.arange(6.0))
    >>> handle.shape, handle.dtype, handle.nbytes
    ((6,), dtype('float64'), 48)
    >>> len(pickle.dumps(handle)) < 300  # the name, not the data
    True
    >>> handle.view()
    array([0., 1., 2., 3., 4., 5.])
    """

    __slots__ = (
        "_local",
        "dtype",
        "name",
        "offset",
        "segment_nbytes",
        "shape",
        "strides",
        "writable",
    )

    def __init__(
        self,
        name: str,
        segment_nbytes: int,
        shape: tuple[int, ...],
        dtype: Any,
        offset: int,
        strides: tuple[int, ...],
        writable: bool,
        _local: np.ndarray | None = None,
    ) -> None:
        self.name = name
        self.segment_nbytes = int(segment_nbytes)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        self.strides = tuple(int(s) for s in strides)
        self.writable = bool(writable)
        self._local = _local

    @property
    def nbytes(self) -> int:
        """Bytes of the array (not of the whole segment)."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def view(self) -> np.ndarray:
        """The array: this process's own in its creator, else an attached view.

        Returns
        -------
        numpy.ndarray
            Read-only in another process unless the handle is ``writable``.
        """
        if self._local is not None:
            return self._local
        root = attached_root(self.name, self.segment_nbytes)
        arr = np.ndarray(
            self.shape, self.dtype, buffer=root, offset=self.offset, strides=self.strides
        )
        if not self.writable:
            arr.flags.writeable = False
        return arr

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.view()
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    def as_readonly(self) -> SharedArray:
        """The same array, as a handle whose views elsewhere are read-only."""
        return SharedArray(
            self.name,
            self.segment_nbytes,
            self.shape,
            self.dtype,
            self.offset,
            self.strides,
            False,
            _local=self._local,
        )

    def __reduce__(self) -> tuple:
        return (
            SharedArray,
            (
                self.name,
                self.segment_nbytes,
                self.shape,
                self.dtype.str if not self.dtype.fields else self.dtype,
                self.offset,
                self.strides,
                self.writable,
            ),
        )

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"SharedArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, {mode})"


# -- creation -----------------------------------------------------------------
def empty(shape: int | Iterable[int], dtype: Any = float, order: str = "C") -> np.ndarray:
    """An uninitialised array in shared memory; workers get it with no copy.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of the new array.
    dtype : data-type, default float
        Any numpy dtype without Python objects.
    order : {"C", "F"}, default "C"
        Memory layout.

    Returns
    -------
    numpy.ndarray
        A writable array over a new segment. The segment is unlinked when
        the last view of it dies, and at exit.

    Raises
    ------
    InvalidArgumentTypeError
        For an object dtype (its elements are pointers into this process),
        or a ``shape``, ``dtype`` or ``order`` of the wrong kind (also a
        ``TypeError``).
    InvalidArgumentError
        For a negative dimension or an ``order`` other than "C" and "F"
        (also a ``ValueError``).
    SharedMemoryCapacityError
        ``/dev/shm`` has no room for it (checked before any byte is written).

    See Also
    --------
    zeros, share

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> y = sks.empty((4, 3), dtype="float32")
    >>> y.shape, y.dtype
    ((4, 3), dtype('float32'))
    >>> sks.handle_of(y) is not None  # workers get it by name, with no copy
    True
    """
    return _new_array(shape, dtype, order)


def _new_array(
    shape: int | Iterable[int], dtype: Any, order: str, data: memoryview | None = None
) -> np.ndarray:
    """An array over a new segment, holding ``data`` (its bytes in memory order) if given."""
    shape_t = _checks.shape("shape", shape)
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise InvalidArgumentTypeError("dtype", f"is not a numpy dtype: {exc}") from None
    if dtype.hasobject:
        raise InvalidArgumentTypeError(
            "dtype", "holds Python objects: pointers into one process, which cannot be shared"
        )
    _checks.choice("order", order, ("C", "F"))
    nbytes = int(np.prod(shape_t, dtype=np.int64)) * dtype.itemsize
    seg = Segment.create(nbytes, description=f"{shape_t} {dtype}", data=data)
    arr = np.ndarray(shape_t, dtype, buffer=seg.root, order=order)
    seg.close()  # the array now holds the only reference to the mapping
    return arr


def zeros(shape: int | Iterable[int], dtype: Any = float, order: str = "C") -> np.ndarray:
    """A zero-filled array in shared memory. Fresh shared memory is zeroed by the OS.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of the new array.
    dtype : data-type, default float
        Any numpy dtype without Python objects.
    order : {"C", "F"}, default "C"
        Memory layout.

    Returns
    -------
    numpy.ndarray
        A writable array over a new segment, all zeros: an ``out=`` array
        that workers write into in place.

    Raises
    ------
    InvalidArgumentError
        As :func:`empty`.
    SharedMemoryCapacityError
        ``/dev/shm`` has no room for it.

    See Also
    --------
    empty, share

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> out = sks.zeros(4)
    >>> def fill(i):
    ...     out[i] = i * i
    >>> _ = sks.parallel_map(fill, range(4), out=[out], backend="serial")
    >>> out
    array([0., 1., 4., 9.])
    """
    return empty(shape, dtype, order)


def share(a: Any) -> SharedArray:
    """Copy ``a`` into a new segment (one memcpy) and return its handle.

    Share a big input once for many calls: the array from
    ``share(x).view()`` reaches workers with zero copies, where a plain
    ``x`` is copied into shared memory on every call.

    Parameters
    ----------
    a : array_like or SharedArray
        The data; a ``SharedArray`` is returned as is. Fortran-ordered
        arrays keep their order.

    Returns
    -------
    SharedArray
        The handle; ``.view()`` gives the array (writable in this process).

    Raises
    ------
    InvalidArgumentTypeError
        For an object dtype (its elements are Python objects private to
        this process); also a ``TypeError``.
    SharedMemoryCapacityError
        ``/dev/shm`` has no room for it.

    Examples
    --------
    >>> import numpy as np
    >>> import shm_kernel_safe as sks
    >>> x = sks.share(np.arange(12.0).reshape(4, 3)).view()
    >>> sks.handle_of(x) is not None
    True
    >>> sks.parallel_map(lambda i: float(x[i].sum()), range(4), backend="serial")
    array([ 3., 12., 21., 30.])
    """
    if isinstance(a, SharedArray):
        return a
    arr = np.asarray(a)
    if arr.dtype.hasobject:
        private = "its elements are Python objects private to this process"
        raise InvalidArgumentTypeError(
            "a",
            f"is an object array: {private}",
            message=f"cannot share an array of dtype object (shape {arr.shape}): {private}",
        )
    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        # Its bytes as they lie in memory go in as the segment is made.
        raw = arr.T if order == "F" else arr
        out = _new_array(arr.shape, arr.dtype, order, memoryview(raw.reshape(-1).view(np.uint8)))
    else:
        out = empty(arr.shape, arr.dtype, order=order)
        np.copyto(out, arr, casting="no")
    handle = handle_of(out)
    assert handle is not None
    return handle


def handle_of(arr: np.ndarray) -> SharedArray | None:
    """A handle for an array that lives in a segment this process created.

    Parameters
    ----------
    arr : numpy.ndarray
        Any array; views and slices of a shared array have handles too.

    Returns
    -------
    SharedArray or None
        The handle, or None for ordinary arrays and for segments whose name
        was already unlinked (no other process could attach to them any
        more).

    Examples
    --------
    >>> import numpy as np
    >>> import shm_kernel_safe as sks
    >>> y = sks.zeros((10, 2))
    >>> sks.handle_of(y[2:5]).shape
    (3, 2)
    >>> sks.handle_of(np.zeros(3)) is None
    True
    """
    if not isinstance(arr, np.ndarray):
        return None
    root, mapping = _root_and_mapping(arr)
    if mapping is None or root is None:
        return None
    name = segment_name_of_mapping(mapping)
    if name is None:
        return None
    offset = arr.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return SharedArray(
        name,
        root.nbytes,
        arr.shape,
        arr.dtype,
        offset,
        arr.strides,
        bool(arr.flags.writeable),
        _local=arr,
    )


def _root_and_mapping(arr: np.ndarray) -> tuple[np.ndarray | None, object | None]:
    obj: Any = arr
    for _ in range(_CHAIN_LIMIT):
        base = obj.base
        if isinstance(base, np.ndarray):
            obj = base
            continue
        if isinstance(base, memoryview):
            try:
                inner = base.obj
            except ValueError:
                return None, None
            return (obj, inner) if isinstance(inner, mmap.mmap) else (None, None)
        return (obj, base) if isinstance(base, mmap.mmap) else (None, None)
    return None, None


# -- attaching (worker side) -----------------------------------------------
_attach_lock = threading.Lock()
_attached: dict[str, Segment] = {}


def attached_root(name: str, nbytes: int) -> np.ndarray:
    """Root of a segment mapped once per process and kept for reuse."""
    with _attach_lock:
        seg = _attached.get(name)
        if seg is None:
            seg = Segment.attach(name, nbytes)
            _attached[name] = seg
        return seg.root


def attached_names() -> set[str]:
    with _attach_lock:
        return set(_attached)


def release_attached(keep: Iterable[str] = ()) -> None:
    """Drop cached attachments not in ``keep``; live views stay mapped."""
    keep = set(keep)
    with _attach_lock:
        for name in [n for n in _attached if n not in keep]:
            _attached.pop(name).close()


# -- dangling detection -------------------------------------------------------
def is_dangling(obj: Any) -> bool:
    """Whether ``obj`` is an ndarray whose memory has been unmapped.

    Follows the ``.base`` chain to its end and asks whether that is a closed
    ``mmap.mmap`` or a released ``memoryview``. Never reads array memory, so
    it is safe to call on exactly the arrays that would crash on a read.

    Parameters
    ----------
    obj : object
        Anything; only ndarrays can be dangling.

    Returns
    -------
    bool
        True when reading ``obj`` would touch unmapped memory.

    Examples
    --------
    >>> import mmap
    >>> import numpy as np
    >>> import shm_kernel_safe as sks
    >>> mm = mmap.mmap(-1, 80)
    >>> arr = np.ndarray((10,), np.float64, buffer=mm)
    >>> sks.is_dangling(arr)
    False
    >>> mm.close()  # unmapped behind numpy's back: arr must not be read now
    >>> sks.is_dangling(arr)
    True
    >>> sks.is_dangling([1, 2])
    False
    """
    if not isinstance(obj, np.ndarray):
        return False
    return chain_end_released(obj)


def chain_end_released(obj: Any) -> bool:
    """Whether the buffer at the end of ``obj``'s base chain is gone."""
    end: Any = obj
    for _ in range(_CHAIN_LIMIT):
        if isinstance(end, np.ndarray):
            if end.base is None:
                return False
            end = end.base
        elif isinstance(end, memoryview):
            try:
                end = end.obj
            except ValueError:  # "operation forbidden on released memoryview"
                return True
            if end is None:
                return False
        elif isinstance(end, mmap.mmap):
            return bool(end.closed)
        else:
            return False
    return False


def label(arr: np.ndarray, text: str) -> None:
    """Attach a human description to the segment behind ``arr`` (for status)."""
    handle = handle_of(arr)
    if handle is not None:
        describe(handle.name, text)
