"""One check per kind of argument, shared by every layer that takes arguments.

Each helper returns the value normalised (a numpy integer becomes an
``int``, a single array given where arrays are expected becomes a tuple of
one) or raises :class:`~shm_kernel_safe.errors.InvalidArgumentError` /
:class:`~shm_kernel_safe.errors.InvalidArgumentTypeError` naming the
argument. A leaf, so that the run's options (``engine/options.py``), each
transport's options and the share cache's cap all use the same words.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, InvalidArgumentTypeError


def _is_int(value: Any) -> bool:
    # numbers.Integral covers int and numpy integers (np.int64(2) from a
    # computation is as good as 2); bool is an int by accident of history.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def count(name: str, value: Any, *, minimum: int = 1, optional: bool = True) -> int | None:
    """An integer ``>= minimum`` (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if not _is_int(value):
        raise InvalidArgumentTypeError(
            name, f"must be an integer >= {minimum}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise InvalidArgumentError(name, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def seconds(name: str, value: Any, *, optional: bool = True) -> float | None:
    """A positive number of seconds (None passes when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentTypeError(
            name, f"must be a positive number of seconds, got {type(value).__name__} {value!r}"
        )
    if not value > 0:  # also refuses NaN
        raise InvalidArgumentError(name, f"must be a positive number of seconds, got {value!r}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """True or False (a numpy bool too); not any truthy value: ``wait="no"``
    would otherwise mean wait."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentTypeError(
            name, f"must be True or False, got {type(value).__name__} {value!r}"
        )
    return bool(value)


def path(name: str, value: Any, *, optional: bool = True) -> str | os.PathLike | None:
    """A file or folder path (None passes when ``optional``)."""
    if (value is None and optional) or isinstance(value, (str, os.PathLike)):
        return value
    raise InvalidArgumentTypeError(name, f"must be a path, got {type(value).__name__} {value!r}")


def path_or_flag(name: str, value: Any) -> str | os.PathLike | bool | None:
    """A file path, True/False, or None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None or isinstance(value, (str, os.PathLike)):
        return value
    raise InvalidArgumentTypeError(
        name, f"must be a file path, True, False or None, got {type(value).__name__} {value!r}"
    )


def shape(name: str, value: Any) -> tuple[int, ...]:
    """An array shape: an integer >= 0 or an iterable of them."""
    if _is_int(value):
        value = (value,)
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgumentTypeError(
            name, f"must be an integer or a tuple of integers, got {type(value).__name__} {value!r}"
        )
    dims = tuple(value)
    for i, dim in enumerate(dims):
        if not _is_int(dim):
            raise InvalidArgumentTypeError(
                name, f"must hold integers >= 0, got {type(dim).__name__} {dim!r} at position {i}"
            )
        if dim < 0:
            raise InvalidArgumentError(name, f"must hold integers >= 0, got {dim} at position {i}")
    return tuple(int(d) for d in dims)


def callable_with(name: str, value: Any, signature: str, *args: Any) -> Any:
    """Something that can be called as ``value(*args)`` (``signature`` says
    how, in the message): a wrong one would fail only once workers run. A
    callable whose parameters Python cannot read (some builtins) is taken
    on trust."""
    callable_(name, value)
    try:
        parameters = inspect.signature(value)
    except (ValueError, TypeError):
        return value
    try:
        parameters.bind(*args)
    except TypeError as exc:
        raise InvalidArgumentTypeError(name, f"must be callable as {signature}: {exc}") from None
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise InvalidArgumentTypeError(
            name,
            f"must be one of {', '.join(map(repr, choices))}, got {type(value).__name__}",
        )
    if value not in choices:
        raise InvalidArgumentError(
            name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return value


def arrays(name: str, value: Any, *, writable: bool = False) -> tuple[np.ndarray, ...]:
    """Numeric ndarrays: a single array, or an iterable of them (not nested)."""
    if isinstance(value, np.ndarray):
        value = (value,)  # out=y means out=[y]
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgumentTypeError(
            name, f"must be an ndarray or a list of ndarrays, got {type(value).__name__}"
        )
    result = tuple(value)
    for i, arr in enumerate(result):
        if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
            raise InvalidArgumentTypeError(name, f"is {_a(arr)}, not a numeric ndarray", index=i)
        if writable and not arr.flags.writeable:
            raise InvalidArgumentError(name, "is read-only", index=i)
    return result


def _a(value: Any) -> str:
    kind = type(value).__name__
    if isinstance(value, np.ndarray):
        kind = f"{value.dtype} ndarray"  # an object array is an ndarray too
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def callable_(name: str, value: Any) -> Any:
    """Something to call."""
    if not callable(value):
        raise InvalidArgumentTypeError(name, f"must be callable, got {type(value).__name__}")
    return value


def unknown_keywords(
    where: str, given: dict[str, Any], peers: dict[str, str], known: Iterable[str] = ()
) -> None:
    """Refuse keyword arguments ``where`` does not take, with a hint: the
    argument of ours for a name other libraries use (``peers``: name ->
    hint), or the closest of the ``known`` names for a typo."""
    if not given:
        return
    name = sorted(given)[0]
    hint = peers.get(name)
    if hint is None:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"{close[0]}=" if close else None
    if hint is None:
        raise InvalidArgumentTypeError(
            name, f"is not an argument of {where}", message=f"{where} has no {name}= argument"
        )
    raise InvalidArgumentTypeError(
        name,
        f"is not an argument of {where}; did you mean {hint}?",
        message=f"{where} has no {name}= argument; did you mean {hint}?",
    )
