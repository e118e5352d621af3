"""The one rule for what a run returns, the same on every transport.

Every transport ends with one value per item (or None where the item did
not complete); :func:`assemble` alone turns them into the call's result:

=====================================  ====================================
per-item results (of the done items)   the call returns
=====================================  ====================================
numbers (Python or NumPy scalars,      a 1-d ``ndarray`` (NumPy's common
0-d arrays)                            dtype of the values)
arrays of one shape (not ``object``)   an ``ndarray`` of shape ``(n, *shape)``
either of those, and some item did     a ``MaskedArray``, masked where
not complete (failed, not run)         items did not complete
either of those, and some results      a ``MaskedArray`` that keeps those
are masked arrays with masked          masks (and masks items not done)
elements
anything else (strings, None, mixed    a ``list`` in item order, None
shapes, dicts, ...)                    where items did not complete
no item                                ``[]``
=====================================  ====================================

Always memory the caller owns, never a view of shared memory. Transports
that store results in a shared array (local) keep only results of the
probe's exact type there (:func:`stack_layout`); the others come back as
values, so the gathered values, and hence the result, are the same as on a
transport that keeps every value (serial, dask).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .protocol import ChunkResult

#: Results of these types stack into a 1-d ndarray.
SCALAR_TYPES = (bool, int, float, complex, np.bool_, np.number)
_PYTHON_SCALARS = (bool, int, float, complex)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, SCALAR_TYPES):
        return True
    return isinstance(value, np.ndarray) and value.ndim == 0 and not value.dtype.hasobject


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim > 0 and not value.dtype.hasobject


def _element(value: Any) -> Any:
    return np.ma.getdata(value)[()] if isinstance(value, np.ndarray) else value


def _mask_of(value: Any) -> Any:
    return np.ma.getmaskarray(value) if isinstance(value, np.ndarray) else False


def _stack(present: list) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(data, element mask or None) of the done values when they stack, else None."""
    # ``all`` stops at the first value that does not stack (a tuple): a run
    # of values that don't stack costs one look, not a pass over them.
    if all(_is_scalar(v) for v in present):
        # 0-d arrays count as their element, so they stack like scalars.
        data = np.asarray([_element(v) for v in present])
    elif all(_is_array(v) for v in present) and len({v.shape for v in present}) == 1:
        data = np.stack([np.ma.getdata(v) for v in present])
    else:
        return None
    if not any(isinstance(v, np.ma.MaskedArray) for v in present):
        return data, None
    mask = np.stack([_mask_of(v) for v in present])
    return data, mask.reshape(data.shape)


def assemble(values: list, done: np.ndarray | None = None) -> np.ndarray | np.ma.MaskedArray | list:
    """The call's result from one value per item (see the module's table).

    Parameters
    ----------
    values : list
        One entry per item; entries where ``done`` is False are ignored.
    done : numpy.ndarray of bool, optional
        Which items completed (default: all).

    Returns
    -------
    numpy.ndarray, numpy.ma.MaskedArray or list
    """
    n_items = len(values)
    if n_items == 0:
        return []
    if done is None:
        done = np.ones(n_items, dtype=bool)
    kept = np.flatnonzero(done)
    complete = len(kept) == n_items
    present = values if complete else [values[i] for i in kept]
    stacked = _stack(present) if len(kept) else None
    if stacked is None:
        if complete:
            return list(values)
        return [v if d else None for v, d in zip(values, done.tolist(), strict=True)]
    data, element_mask = stacked
    if complete and element_mask is None:
        return data
    full = np.zeros((n_items, *data.shape[1:]), dtype=data.dtype)
    full[kept] = data
    mask = np.ones(full.shape, dtype=bool)
    mask[kept] = False if element_mask is None else element_mask
    if not mask.any():
        return full
    return np.ma.MaskedArray(full, mask=mask)


def stack_layout(first: Any) -> tuple[tuple[int, ...], np.dtype, type | None] | None:
    """(shape of one result, dtype, scalar type) when results like ``first``
    can be stored in one array, else None.

    A worker stores a result there only when it is exactly like ``first``
    (the same scalar type; or a plain ndarray of the same shape and dtype):
    anything else, a masked array included, travels as a value, so that
    :func:`assemble` sees what the function returned.
    """
    if isinstance(first, SCALAR_TYPES):
        return (), np.asarray(first).dtype, type(first)
    if type(first) is np.ndarray and not first.dtype.hasobject:
        return first.shape, first.dtype, None
    return None


def stored_value(stacked: np.ndarray, index: int, first: Any) -> Any:
    """Item ``index``'s result as the function returned it, from the shared
    array it was stored in (results there are all of ``first``'s kind)."""
    element = stacked[index]
    if type(first) in _PYTHON_SCALARS:
        return element.item()
    if isinstance(first, np.ndarray):
        return np.array(element)  # a copy; a 0-d array stays a 0-d array
    return element  # a NumPy scalar: already a copy


def gather(
    results: Iterable[ChunkResult], n_items: int, stacked: np.ndarray | None, first: Any = None
) -> np.ndarray | np.ma.MaskedArray | list:
    """The call's return value from its chunks' results, every item done.

    ``stacked`` is the array workers stored results like ``first`` in (when
    the transport offered one); results that did not fit it arrive as
    ``misfits``.
    """
    ordered = sorted(results, key=lambda r: r.chunk)
    if stacked is None:
        values: list = []
        for res in ordered:
            values.extend(res.values or [])
        return assemble(values)
    misfits: dict[int, Any] = {}
    for res in ordered:
        misfits.update(res.misfits)
    if not misfits:
        # Every result has first's exact type: what assemble would build.
        return np.array(stacked, copy=True)  # owned memory, never a view
    values = [
        misfits[i] if i in misfits else stored_value(stacked, i, first) for i in range(n_items)
    ]
    return assemble(values)


def item_values(
    results: Iterable[ChunkResult],
    starts: dict[int, int],
    n_items: int,
    stacked: np.ndarray | None,
    done: np.ndarray,
    first: Any = None,
) -> list:
    """One entry per item, None where nothing completed (``starts``: chunk -> first item)."""
    values: list = [None] * n_items
    if stacked is not None:
        for i in np.flatnonzero(done):
            values[i] = stored_value(stacked, i, first)
    for res in results:
        if res.values:
            start = starts[res.chunk]
            values[start : start + len(res.values)] = res.values
        for i, value in res.misfits.items():
            values[i] = value
    return values


def prior_values(partial: Any, done: np.ndarray) -> list:
    """Per-item values of an earlier run's ``partial`` (None where not done).

    A row of a masked ``partial`` with nothing masked is the plain array (or
    scalar) it was: :func:`assemble` then rebuilds what the earlier run
    would have returned.
    """
    values: list = [None] * len(done)
    for i in np.flatnonzero(done):
        value = partial[i]
        if isinstance(value, np.ma.MaskedArray) and not np.ma.getmaskarray(value).any():
            value = np.ma.getdata(value).copy()
        elif isinstance(value, np.ndarray) and not isinstance(value, np.ma.MaskedArray):
            value = value.copy()
        values[i] = value
    return values
