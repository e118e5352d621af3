"""Warnings raised in workers, shown at the cell's line with the item.

A worker runs code that cloudpickle rebuilt, whose file the worker cannot
name (``<dynamic-code>``) or read, and prints its warnings to a stderr the
kernel may or may not forward: ``<dynamic-code>:1: UserWarning: ...``, once
per worker, pointing nowhere. Instead:

* in the worker, :func:`recording` (around a chunk's item loop) records each
  distinct warning once per chunk, with the item that first raised it and
  the function it came from, and prints nothing. Inside it every warning
  is recorded (``simplefilter("always")``, below any filter the cell sets
  itself), so that the *kernel's* filters decide what is shown, as if the
  cell ran there;
* in the parent, :func:`reissue` maps each one back to its real file and
  line (the cell's line for cell code, as tracebacks are) and issues it with
  ``warnings.warn_explicit`` against the registry of the module it came
  from. So the kernel's filters apply as to its own code: by default each
  warning shows once per location (text, category, line), however many
  items, chunks and workers raised it, and ``filterwarnings("ignore")`` in
  the kernel silences it. A shown warning names the item, e.g.
  ``<shm_parallel cell 3>:2: UserWarning: careful (item 7)``.

The chunk loops use it as::

    with worker_warnings.recording(items) as seen:
        for i in range(start, stop):
            seen.index = i
            ...
    result.warnings = seen.captured
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import _text
from . import tracebacks

#: Files of code compiled by ``%%shm_parallel``; their module is ``__main__``
#: from the user's point of view (cell code runs in the kernel's namespace).
CELL_FILE_PREFIX = "<shm_parallel cell "
_MAX_REPR = 200


@dataclass
class CapturedWarning:
    """One distinct warning a worker saw, in a form that always pickles."""

    index: int  # the item that first raised it in its chunk
    item_repr: str
    category: Any  # the Warning class, or its name when it does not pickle
    message: str
    filename: str
    lineno: int
    function: str  # the function the warning points into ('' if not found)
    module: str  # that code's ``__name__`` ('' if not found)


class Recorder:
    """Collects a chunk's warnings; ``index`` is the item running now."""

    def __init__(self, items: Any) -> None:
        self.items = items
        self.index = -1
        self.captured: list[CapturedWarning] = []
        self._seen: set[tuple] = set()

    def add(self, message: Any, category: type, filename: str, lineno: int) -> None:
        """Record one warning, unless the same one was recorded in this chunk.

        Parameters
        ----------
        message, category, filename, lineno
            As ``warnings.showwarning`` receives them.
        """
        text = str(message)
        key = (category, text, filename, lineno)
        if key in self._seen:
            return
        self._seen.add(key)
        function, module = _locate(filename, lineno)
        item_text = _text.item_repr(self.items, self.index, _MAX_REPR)
        try:
            pickle.dumps(category)
        except Exception:
            category = f"{category.__module__}.{category.__qualname__}"
        self.captured.append(
            CapturedWarning(
                self.index, item_text, category, text, filename, lineno, function, module
            )
        )


_local = threading.local()
_hook_lock = threading.Lock()
_previous_showwarning: Any = None


def _showwarning(
    message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    recorder = getattr(_local, "recorder", None)
    if recorder is None:  # another thread, or outside a chunk: Python's own handling
        _previous_showwarning(message, category, filename, lineno, file, line)
        return
    recorder.add(message, category, filename, lineno)


def _locate(filename: str, lineno: int) -> tuple[str, str]:
    """The function and module of the frame the warning points at."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == filename and frame.f_lineno == lineno:
            return frame.f_code.co_name, str(frame.f_globals.get("__name__", ""))
        frame = frame.f_back
    return "", ""


@contextlib.contextmanager
def recording(items: Any) -> Iterator[Recorder]:
    """Record the warnings raised in this thread instead of printing them.

    Parameters
    ----------
    items : sequence
        The call's items, to name the one that raised each warning (set
        ``Recorder.index`` before running each).

    Yields
    ------
    Recorder
        Its ``captured`` list goes back to the parent with the chunk's result.
    """
    global _previous_showwarning
    with _hook_lock:
        if warnings.showwarning is not _showwarning:
            _previous_showwarning = warnings.showwarning
            warnings.showwarning = _showwarning
    recorder = Recorder(items)
    outer = getattr(_local, "recorder", None)
    _local.recorder = recorder
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # catch_warnings restores showwarning on exit: keep ours inside
            warnings.showwarning = _showwarning
            yield recorder
    finally:
        _local.recorder = outer


# -- the parent ---------------------------------------------------------------
_registries: dict[str, dict] = {}


def reissue(captured: list[CapturedWarning] | None, fn: Any) -> None:
    """Issue the warnings a chunk recorded, at their real file and line.

    Parameters
    ----------
    captured : list of CapturedWarning
        ``ChunkResult.warnings``; nothing happens for an empty list or None.
    fn : callable
        The function the run mapped: where it came from tells the real file
        of ``<dynamic-code>`` frames (as for tracebacks).
    """
    if not captured:
        return
    files = tracebacks.code_files(fn)
    for w in captured:
        filename = w.filename
        if filename == tracebacks.DYNAMIC and w.function in files:
            filename = files[w.function]
        module = w.module
        if filename.startswith(CELL_FILE_PREFIX) or module == "__shm_parallel__":
            module = "__main__"
        category = w.category if isinstance(w.category, type) else UserWarning
        text = w.message if isinstance(w.category, type) else f"{w.category}: {w.message}"
        _issue(text, category, filename, w.lineno, module, f"item {w.index}")


def _registry(module: str) -> dict:
    mod = sys.modules.get(module) if module else None
    namespace = getattr(mod, "__dict__", None)
    if isinstance(namespace, dict):
        return namespace.setdefault("__warningregistry__", {})
    return _registries.setdefault(module, {})


def _issue(text: str, category: type, filename: str, lineno: int, module: str, where: str) -> None:
    """``warn_explicit`` with the kernel's filters on the original text; the
    item is added to what is shown, not to what is filtered on."""
    shown = warnings.showwarning

    def show(message: Any, cat: type, fname: str, line_no: int, file: Any = None, line=None):
        shown(_with_where(message, cat, where), cat, fname, line_no, file, line)

    warnings.showwarning = show
    try:
        warnings.warn_explicit(
            text, category, filename, lineno, module=module or None, registry=_registry(module)
        )
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = shown


def _with_where(message: Any, category: type, where: str) -> Any:
    text = f"{message} ({where})"
    try:
        return category(text)
    except Exception:
        return text
