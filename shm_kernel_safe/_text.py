"""Text for messages: sizes in binary units and one-line reprs.

A leaf below every layer, so that the errors, the engine and the front ends
word sizes and items the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def human_bytes(nbytes: int) -> str:
    """``nbytes`` in binary units, as ``df -h`` and ``%shm_status`` show them.

    >>> human_bytes(1_280_000_000)
    '1.2 GiB'
    """
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis saying it was cut."""
    return text if len(text) <= width else text[: width - 3] + "..."


def item_repr(items: Sequence[Any], index: int, width: int = 80) -> str:
    """A one-line repr of ``items[index]``, or ``<item N>`` where repr fails.

    Messages name the item a failure happened on; a user's object whose
    repr raises or runs over a screen must not hide the failure itself.
    """
    try:
        text = repr(items[index])
    except Exception:
        return f"<item {index}>"
    return shorten(text, width)
