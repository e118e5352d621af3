"""What runs inside a worker process: one chunk of items per task.

A task message carries only small handles: the call's pickled payload sits
in a shared segment and is unpickled once per worker per call (not per
task), and every segment it references stays mapped in the worker for the
next call that uses it (``arrays.attached_root``). Progress is one integer
store per item in the control block, never a message.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import arrays, control, sharing, tracebacks, worker_warnings
from .arrays import SharedArray


@dataclass(frozen=True)
class Payload:
    """Everything a call sends to every worker once."""

    fn: Any
    items: Any  # a sequence supporting len() and []
    # Segments the parent still holds under a name: workers keep them mapped
    # even when this call does not use them (the next call likely will).
    keep: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ChunkTask:
    call_id: str
    payload: SharedArray  # uint8 bytes of the pickled Payload
    control: SharedArray  # int64 control block, writable
    chunk: int
    start: int
    stop: int
    out: SharedArray | None = None  # stacked results, when they stack
    out_scalar_type: type | None = None


@dataclass
class RemoteError:
    """A task's exception, in a form that always pickles."""

    index: int
    item_repr: str
    exc_type: str
    message: str
    frames: list  # (file, line, function): rendered by the parent with its sources
    exc_lines: list[str]
    original: BaseException | None = None


@dataclass
class ChunkResult:
    chunk: int
    done: int = 0
    values: list | None = None  # when there is no shared result array
    misfits: dict[int, Any] = field(default_factory=dict)  # results that do not stack
    error: RemoteError | None = None
    seconds: float = 0.0  # wall time of the items, for adaptive chunk sizing
    # dask backend: elements of output arrays the chunk changed, key -> (flat indices, values)
    writes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # worker_warnings.CapturedWarning


_current: dict[str, Any] = {"call_id": None, "payload": None, "names": frozenset()}


def _payload_for(task: ChunkTask) -> Payload:
    if _current["call_id"] != task.call_id:
        _current["payload"] = None  # drop the previous call's objects first
        raw = task.payload.view()
        payload, names = sharing.loads(memoryview(raw))
        del raw
        names |= {task.payload.name, task.control.name}
        if task.out is not None:
            names.add(task.out.name)
        # Keep mapped what this call uses and what the parent still holds;
        # forget segments of earlier calls that are gone (auto-shared copies).
        arrays.release_attached(keep=names | payload.keep)
        _current.update(call_id=task.call_id, payload=payload, names=frozenset(names))
    return _current["payload"]


def run_chunk(task: ChunkTask) -> ChunkResult:
    # A memoryview indexes to plain ints, about twice as fast per item as
    # numpy scalar indexing; the per-item loop below is all overhead.
    ctrl = memoryview(task.control.view())
    row = control.HEADER + control.ROW * task.chunk
    ctrl[row + control.PID] = os.getpid()
    ctrl[row + control.STATE] = control.RUNNING
    result = ChunkResult(task.chunk)
    try:
        payload = _payload_for(task)
    except BaseException as exc:
        result.error = _describe(exc, task.start, None, loading=True)
        ctrl[row + control.STATE] = control.FINISHED
        return result
    fn, items = payload.fn, payload.items
    out = task.out.view() if task.out is not None else None
    values: list | None = [] if out is None else None
    scalar_type = task.out_scalar_type
    done_slot = row + control.DONE
    i = task.start
    t0 = time.perf_counter()
    try:
        with worker_warnings.recording(items) as seen:
            for i in range(task.start, task.stop):
                if ctrl[control.CANCEL]:
                    break
                seen.index = i
                value = fn(items[i])
                if out is None:
                    values.append(value)  # type: ignore[union-attr]
                elif not _store(out, i, value, scalar_type):
                    result.misfits[i] = value
                ctrl[done_slot] += 1
    except BaseException as exc:
        result.error = _describe(exc, i, items)
    result.warnings = seen.captured
    result.seconds = time.perf_counter() - t0
    result.done = int(ctrl[done_slot])
    result.values = values
    ctrl[row + control.STATE] = control.FINISHED
    return result


def _store(out: np.ndarray, i: int, value: Any, scalar_type: type | None) -> bool:
    """Write ``value`` into the stacked result if it fits exactly."""
    try:
        if scalar_type is not None:
            if type(value) is scalar_type:
                out[i] = value
                return True
            return False
        if (
            isinstance(value, np.ndarray)
            and value.shape == out.shape[1:]
            and value.dtype == out.dtype
        ):
            out[i] = value
            return True
    except (OverflowError, ValueError, TypeError):
        pass
    return False


def _describe(exc: BaseException, index: int, items: Any, loading: bool = False) -> RemoteError:
    # Drop run_chunk's own frame: the traceback starts in the user's code.
    frames, exc_lines = tracebacks.extract(exc, skip=0 if loading else 1)
    try:
        item_repr = "<loading the function in the worker>" if loading else repr(items[index])
    except Exception:
        item_repr = f"<item {index}>"
    if len(item_repr) > 200:
        item_repr = item_repr[:197] + "..."
    original: BaseException | None = exc
    try:
        import pickle

        pickle.loads(pickle.dumps(exc))
    except Exception:
        original = None
    return RemoteError(
        index, item_repr, type(exc).__qualname__, str(exc), frames, exc_lines, original
    )


def ping() -> int:
    """A no-op task used to start workers ahead of a call."""
    return os.getpid()
