"""Gathering a run's results: one ndarray when they stack, else a list;
always memory the caller owns, never a view of shared memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .protocol import ChunkResult

#: Results of these types stack into a 1-d ndarray.
SCALAR_TYPES = (bool, int, float, complex, np.bool_, np.number)


def stack_or_list(values: list) -> np.ndarray | list:
    """An ndarray when the values are numbers or equal-shape arrays, else the list."""
    if not values:
        return values
    if all(isinstance(v, SCALAR_TYPES) for v in values):
        return np.asarray(values)
    if all(isinstance(v, np.ndarray) and not v.dtype.hasobject for v in values):
        shape = values[0].shape
        if all(v.shape == shape for v in values):
            return np.stack(values)
    return values


def owned(value: Any) -> Any:
    """A copy of an array element the caller can keep (a Python scalar or a new array)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    return value.item() if isinstance(value, np.generic) else value


def stack_layout(first: Any) -> tuple[tuple[int, ...], np.dtype, type | None] | None:
    """(shape of one result, dtype, scalar type) when results like ``first``
    can be stored in one array, else None."""
    if isinstance(first, SCALAR_TYPES):
        return (), np.asarray(first).dtype, type(first)
    if isinstance(first, np.ndarray) and not first.dtype.hasobject:
        return first.shape, first.dtype, None
    return None


def gather(
    results: Iterable[ChunkResult], n_items: int, stacked: np.ndarray | None
) -> np.ndarray | list:
    """The call's return value from its chunks' results, in item order.

    ``stacked`` is the array workers stored results in (when the transport
    offered one); results that did not fit it arrive as ``misfits``.
    """
    ordered = sorted(results, key=lambda r: r.chunk)
    if stacked is None:
        values: list = []
        for res in ordered:
            values.extend(res.values or [])
        return stack_or_list(values)
    misfits: dict[int, Any] = {}
    for res in ordered:
        misfits.update(res.misfits)
    if not misfits:
        return np.array(stacked, copy=True)  # owned memory, never a view
    values = [misfits[i] if i in misfits else owned(stacked[i]) for i in range(n_items)]
    return stack_or_list(values)


def item_values(
    results: Iterable[ChunkResult],
    starts: dict[int, int],
    n_items: int,
    stacked: np.ndarray | None,
    done: np.ndarray,
) -> list:
    """One entry per item, None where nothing completed (``starts``: chunk -> first item)."""
    values: list = [None] * n_items
    if stacked is not None:
        for i in np.flatnonzero(done):
            values[i] = owned(stacked[i])
    for res in results:
        if res.values:
            start = starts[res.chunk]
            values[start : start + len(res.values)] = res.values
        for i, value in res.misfits.items():
            values[i] = value
    return values


def finish(values: list, done: np.ndarray) -> np.ndarray | np.ma.MaskedArray | list:
    """The return value from per-item values: an ndarray when every item is
    done and the values stack; a masked array (masked where not done) when
    the done values stack; else a list with None where not done."""
    n_items = len(values)
    if done.all():
        return stack_or_list(values)
    present = [values[i] for i in np.flatnonzero(done)]
    stacked = stack_or_list(present) if present else []
    if not isinstance(stacked, np.ndarray):
        return [v if d else None for v, d in zip(values, done, strict=True)]
    full = np.zeros((n_items, *stacked.shape[1:]), dtype=stacked.dtype)
    full[done] = stacked
    hidden = ~done.reshape((n_items,) + (1,) * (full.ndim - 1))
    return np.ma.MaskedArray(full, mask=np.broadcast_to(hidden, full.shape).copy())


def prior_values(partial: Any, done: np.ndarray) -> list:
    """Per-item values of an earlier run's ``partial`` (None where not done)."""
    values: list = [None] * len(done)
    for i in np.flatnonzero(done):
        if isinstance(partial, np.ma.MaskedArray):
            values[i] = owned(partial.data[i])
        else:
            values[i] = partial[i]
    return values
