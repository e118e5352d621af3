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

import numpy as np

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
    misfits: dict[int, Any] = field(default_factory=dict)  # results that do not stack
    error: RemoteError | None = None  # the item that stopped the chunk
    failed: dict[int, RemoteError] = field(default_factory=dict)  # items that failed, kept going
    seconds: float = 0.0  # wall time of the items, for adaptive chunk sizing
    # elements of output arrays the chunk changed, key -> (flat indices, values),
    # for transports whose workers cannot write the caller's arrays in place
    writes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # worker_warnings.CapturedWarning


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
    try:
        item_repr = "<loading the function in the worker>" if loading else repr(items[index])
    except Exception:
        item_repr = f"<item {index}>"
    if len(item_repr) > 200:
        item_repr = item_repr[:197] + "..."
    original: BaseException | None = exc
    if not keep_traceback:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            original = None
    return RemoteError(
        index,
        item_repr,
        type(exc).__qualname__,
        str(exc),
        frames,
        exc_lines,
        original,
        exc.__traceback__ if keep_traceback else None,
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
