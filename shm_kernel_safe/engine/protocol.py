"""What crosses a process boundary, in both directions, on every transport.

Parent to workers: the :class:`Payload` (function and items, sent once per
worker per call, never per chunk) and a chunk's index range. Workers to
parent: a :class:`ChunkResult`, with a :class:`RemoteError` when an item
raised. These are plain dataclasses that always pickle; each transport
wraps them in its own envelope (a loky task, a dask task).
"""

from __future__ import annotations

import pickle
import types
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np

from .._text import item_repr
from . import tracebacks


@dataclass(frozen=True)
class Payload:
    """Everything a call sends to every worker once."""

    fn: Any
    items: Any  # a sequence supporting len() and []
    # Segments the parent still holds under a name: workers keep them mapped
    # even when this call does not use them (the next call likely will).
    keep: frozenset[str] = frozenset()


@dataclass
class RemoteError:
    """An item's exception, in a form that always pickles."""

    index: int
    item_repr: str
    exc_type: str
    message: str
    frames: list  # (file, line, function): rendered by the parent with its sources
    exc_lines: list[str]
    original: BaseException | None = None
    # In-process runs only (the serial transport): the live traceback, so
    # that %debug / pdb.post_mortem land in the user's frame.
    traceback: types.TracebackType | None = field(default=None, compare=False)
    # The item ran in the caller's own process: its traceback is not "remote".
    in_process: bool = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["traceback"] = None  # frames do not cross processes
        return state


@dataclass
class ChunkResult:
    """What one chunk did."""

    chunk: int
    done: int = 0  # items processed from the chunk's start (failed ones too, with keep_going)
    values: list | None = None  # results, when the transport keeps no shared result array
    # how many of the first values the message leaves out: the transport's
    # worker logged them already (pickled once), and its parent reads them there
    logged: int = 0
    misfits: dict[int, Any] = field(default_factory=dict)  # results that do not stack
    error: RemoteError | None = None  # the item that stopped the chunk
    failed: dict[int, RemoteError] = field(default_factory=dict)  # items that failed, kept going
    seconds: float = 0.0  # wall time of the items, for adaptive chunk sizing
    # elements of output arrays the chunk changed, key -> (flat indices, values),
    # for transports whose workers cannot write the caller's arrays in place
    writes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # worker_warnings.CapturedWarning
    # (items, chunk start, keep_going), set by the chunk loop, never pickled:
    # to name the item whose result cannot be pickled.
    source: Any = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple:
        # Pickled by the transport's own pickler (loky, dask) on the way back:
        # a result that cannot be pickled becomes its item's error here, in
        # the worker, instead of a bare TypeError without item or partials.
        try:
            data = _dumps(self._state())
        except Exception:
            self.make_sendable()
            data = _dumps(self._state())
        return _chunk_result_from, (data,)

    def _state(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["source"] = None
        return state

    def make_sendable(self) -> None:
        """Turn each result that cannot be pickled into its item's error.

        Every transport returns only results that pickle (the serial one
        checks too, so a run behaves the same on all). With ``keep_going``
        the item fails and the chunk keeps the rest; otherwise the chunk
        ends before that item, as if it had raised.
        """
        if self.source is None or _unpicklable((self.values, self.misfits)) is None:
            return
        items, start, keep_going = self.source
        first = start + self.logged  # the item of values[0]
        candidates = [(first + k, v) for k, v in enumerate(self.values or []) if v is not None]
        candidates += list(self.misfits.items())
        bad = [(i, v, exc) for i, v in candidates if (exc := _unpicklable(v)) is not None]
        bad.sort(key=lambda found: found[0])
        for index, value, exc in bad:
            error = describe_unsendable(exc, index, items, value)
            if keep_going:
                self.failed[index] = error
                if self.values is not None:
                    self.values[index - first] = None
                self.misfits.pop(index, None)
                continue
            self.error = error
            self.done = index - start
            if self.values is not None:
                del self.values[index - first :]
            self.misfits = {i: v for i, v in self.misfits.items() if i < index}
            self.failed = {i: e for i, e in self.failed.items() if i < index}
            break


#: Protocol 4: an array comes back as a writable copy. (Protocol 5 keeps a
#: read-only array's bytes in-band, and it would unpickle read-only.)
_PROTOCOL = 4


def _dumps(state: dict[str, Any]) -> bytes:
    try:
        return pickle.dumps(state, protocol=_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(state, protocol=_PROTOCOL)  # lambdas, local classes


def _chunk_result_from(data: bytes) -> ChunkResult:
    result = ChunkResult.__new__(ChunkResult)
    result.__dict__.update(pickle.loads(data))
    return result


def _unpicklable(value: Any) -> BaseException | None:
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return None
    except Exception:
        pass
    try:
        cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return None
    except Exception as exc:
        return exc


def describe_unsendable(exc: BaseException, index: int, items: Any, value: Any) -> RemoteError:
    """The error of item ``index``, whose result ``value`` cannot be pickled."""
    kind = type(value).__qualname__
    message = (
        f"its result (a {kind}) cannot be pickled, so it cannot come back from a worker "
        f"process: {exc}"
    )
    return RemoteError(
        index,
        item_repr(items, index, 200),
        "TypeError",
        message,
        [],  # no frame of the user's code failed: the pickling did
        [f"TypeError: {message}\n"],
        TypeError(message),
    )


def describe_error(
    exc: BaseException,
    index: int,
    items: Any,
    *,
    loading: bool = False,
    keep_traceback: bool = False,
) -> RemoteError:
    """A :class:`RemoteError` for ``exc``, raised by item ``index`` of ``items``.

    The first frame (the chunk loop's own) is dropped: the traceback starts
    in the user's code. ``loading`` means the payload itself failed to load.
    """
    frames, exc_lines = tracebacks.extract(exc, skip=0 if loading else 1)
    shown = "<loading the function in the worker>" if loading else item_repr(items, index, 200)
    original: BaseException | None = exc
    if not keep_traceback:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            original = None
    return RemoteError(
        index,
        shown,
        type(exc).__qualname__,
        str(exc),
        frames,
        exc_lines,
        original,
        exc.__traceback__ if keep_traceback else None,
        in_process=keep_traceback,
    )


class Subset:
    """``items[positions[k]]`` as a sequence: the items a resumed run still has to do.

    Pickled with the payload (by reference to this module), so workers index
    the caller's items through it without a copy of them.
    """

    __slots__ = ("items", "positions")

    def __init__(self, items: Any, positions: np.ndarray) -> None:
        self.items = items
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> Any:
        return self.items[int(self.positions[k])]

    def __reduce__(self) -> tuple:
        return Subset, (self.items, self.positions)
