"""Keep dangling arrays away from variable explorers.

The safe close (``protect``) means arrays over shared memory no longer dangle.
This module is the second line, for arrays that became dangling where no
close could be intercepted: a segment closed before the extension loaded, an
``mmap.mmap`` closed directly, ``np.memmap._mmap.close()``, a third-party
library. Any read of such an array is a segfault, and variable explorers read
every array in the namespace on their own:

* Spyder's kernel builds its Variable Explorer view in its own
  ``post_execute`` callback, and answers Refresh / option changes /
  "open variable" over its ``spyder_api`` comm (``get_namespace_view``,
  ``get_var_properties``, ``get_value``, ``copy_value``, ``save_namespace``),
  with no IPython event at all;
* JupyterLab's Variable Inspector runs a (non-silent) execute after each
  cell that calls ``repr()`` on every variable;
* VS Code reads variables from a background thread after the execute ends;
* JupyterLab's debugger reads them over the control channel
  (``debugger_guard``).

So the sanitizer runs at ``pre_execute``, *first* among ``post_execute``
callbacks, and in front of each of Spyder's handlers. It replaces every
dangling ndarray (top level, or inside lists, tuples, dicts and object
attributes, to a bounded depth and count) with a :class:`DanglingArray`
placeholder. It never reads array memory: ``is_dangling`` only follows
``.base`` links.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import DanglingArrayError, DanglingAttributeError
from ..memory.arrays import is_dangling
from .debugger_guard import DebuggerGuard
from .placeholder_display import SpyderDisplay

MAX_DEPTH = 3
MAX_OBJECTS = 20_000

_ATOMIC = frozenset({int, float, complex, bool, str, bytes, type(None)})
# Objects of these packages are the kernel's machinery, not user data: never
# walk into them (IPython's ``exit`` object, for one, leads to the shell).
_FRAMEWORK_PREFIXES = (
    "IPython.",
    "ipykernel.",
    "spyder_kernels.",
    "traitlets.",
    "zmq.",
    "jupyter_client.",
    "tornado.",
    "asyncio.",
    "threading",
    "logging",
    "comm.",
    "ipywidgets.",
    "_io",
    "shm_kernel_safe.",
)
_OPAQUE = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
)


class DanglingArray:
    """Stands where an ndarray was whose shared memory is gone.

    Its repr says what the array was and why its data is gone; any use as an
    array raises :class:`DanglingArrayError` instead of crashing the kernel.
    """

    _shm_kernel_safe_placeholder_ = True  # placeholder_display.MARKER

    __slots__ = ("dtype", "name", "reason", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, name: str, reason: str) -> None:
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "reason", reason)

    def _message(self) -> str:
        return (
            f"{self.name}: the {self.shape} {self.dtype} array here lived in shared memory that "
            f"was {self.reason}; its data is gone. Recompute it, or copy arrays out of shared "
            f"memory (np.array(view)) before closing the segment."
        )

    def describe(self) -> str:
        """One line for a variable viewer's Value column, e.g.
        ``array (200000, 16) float64: its shared memory was closed``."""
        return f"array {self.shape} {self.dtype}: its shared memory was {self.reason}"

    def __repr__(self) -> str:
        return (
            f"<DanglingArray shape={self.shape} dtype={self.dtype}: "
            f"its shared memory was {self.reason}>"
        )

    def __str__(self) -> str:
        # What JupyterLab's Variable Inspector and VS Code show as the value
        # (str()); the Inspector hides rows whose str() starts with "<".
        return self.describe()

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise DanglingArrayError(self._message())

    def __getitem__(self, key: Any) -> Any:
        raise DanglingArrayError(self._message())

    def __setitem__(self, key: Any, value: Any) -> None:
        raise DanglingArrayError(self._message())

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in DanglingArray.__slots__:
            # Protocol probes (pickle, copy, display) and slots not yet set.
            raise AttributeError(attr)
        raise DanglingAttributeError(f"{self._message()} (asked for .{attr})")

    def __reduce__(self) -> tuple:
        # Saved, copied or sent to Spyder, it stays a placeholder.
        return (DanglingArray, (self.shape, self.dtype, self.name, self.reason))

    def __setattr__(self, attr: str, value: Any) -> None:
        raise DanglingAttributeError(self._message())


def _placeholder(arr: np.ndarray, path: str) -> DanglingArray:
    return DanglingArray(arr.shape, arr.dtype, path, "closed")


def _format_path(path: tuple) -> str:
    """Paths are built as cheap nested tuples and formatted only on a hit."""
    parts: list[str] = []
    while path:
        path, key, kind = path
        parts.append(
            f".{key}"
            if kind == "attr"
            else (f"[{key!r}]" if kind == "key" else (f"[{key}]" if kind == "idx" else key))
        )
    return "".join(reversed(parts))


class _Walker:
    def __init__(self, max_depth: int, max_objects: int) -> None:
        self.max_depth = max_depth
        self.budget = max_objects
        self.seen: set[int] = set()
        self.replaced: list[str] = []

    def fix(self, obj: Any, path: tuple, depth: int) -> Any:
        """``obj`` itself, or its placeholder; containers are fixed in place."""
        if isinstance(obj, np.ndarray):
            if obj.base is not None and is_dangling(obj):
                name = _format_path(path)
                self.replaced.append(name)
                return _placeholder(obj, name)
            return obj
        kind = type(obj)
        if depth >= self.max_depth or self.budget <= 0 or isinstance(obj, _OPAQUE):
            return obj
        if id(obj) in self.seen:
            return obj
        self.seen.add(id(obj))
        self.budget -= 1
        depth += 1
        if kind is list:
            for i, item in enumerate(obj):
                if type(item) in _ATOMIC:
                    continue
                new = self.fix(item, (path, i, "idx"), depth)
                if new is not item:
                    obj[i] = new
                if self.budget <= 0:
                    break
        elif kind is dict:
            for key, item in list(obj.items()):
                if type(item) in _ATOMIC:
                    continue
                new = self.fix(item, (path, key, "key"), depth)
                if new is not item:
                    obj[key] = new
        elif isinstance(obj, tuple):
            changed = None
            for i, item in enumerate(obj):
                if type(item) in _ATOMIC:
                    continue
                new = self.fix(item, (path, i, "idx"), depth)
                if new is not item:
                    changed = changed or list(obj)
                    changed[i] = new
            if changed is not None:
                try:
                    return kind._make(changed) if hasattr(kind, "_make") else kind(changed)
                except Exception:
                    return tuple(changed)
        elif not (getattr(kind, "__module__", "") or "").startswith(_FRAMEWORK_PREFIXES):
            attrs = getattr(obj, "__dict__", None)
            if isinstance(attrs, dict):
                for key, item in list(attrs.items()):
                    if type(item) in _ATOMIC:
                        continue
                    new = self.fix(item, (path, key, "attr"), depth)
                    if new is not item:
                        try:
                            setattr(obj, key, new)
                        except Exception:
                            attrs[key] = new
        return obj


_lock = threading.RLock()


def sanitize_namespace(
    ns: dict[str, Any], max_depth: int = MAX_DEPTH, max_objects: int = MAX_OBJECTS
) -> list[str]:
    """Replace dangling arrays in ``ns``; return the paths replaced."""
    with _lock:
        walker = _Walker(max_depth, max_objects)
        walker.seen.add(id(ns))
        for name, value in list(ns.items()):
            if type(value) in _ATOMIC:
                continue
            new = walker.fix(value, ((), name, "name"), 0)
            if new is not value:
                ns[name] = new
        return walker.replaced


# -- hooks --------------------------------------------------------------------
SPYDER_CALLS = (
    "get_namespace_view",
    "get_var_properties",
    "get_value",
    "copy_value",
    "save_namespace",
)


class InspectionHooks:
    """Installs the sanitizer in front of every reader of the namespace, and
    removes exactly what it installed."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._event_callbacks: list[tuple[str, Callable]] = []
        self._spyder_handlers: dict[str, Callable] = {}
        self._spyder_attrs: list[str] = []
        self._spyder_display = SpyderDisplay()
        self._debugger_guard = DebuggerGuard(self.sanitize)
        self.installed = False
        self.replaced_total: list[str] = []

    def sanitize(self, *_: Any, **__: Any) -> list[str]:
        replaced = sanitize_namespace(self.shell.user_ns)
        self.replaced_total.extend(replaced)
        return replaced

    def install(self) -> None:
        if self.installed:
            return
        events = self.shell.events
        pre = self._on_pre_execute
        events.register("pre_execute", pre)
        self._event_callbacks.append(("pre_execute", pre))
        post = self._on_post_execute
        # First among post_execute callbacks: ahead of spyder-kernels' own,
        # which builds the Variable Explorer view.
        events.callbacks["post_execute"].insert(0, post)
        self._event_callbacks.append(("post_execute", post))
        self._install_spyder()
        self._debugger_guard.install(getattr(self.shell, "kernel", None))
        self.installed = True

    def _on_pre_execute(self) -> None:
        self.sanitize()

    def _on_post_execute(self) -> None:
        self.sanitize()

    def _install_spyder(self) -> None:
        kernel = getattr(self.shell, "kernel", None)
        comm = getattr(kernel, "frontend_comm", None)
        handlers = getattr(comm, "_remote_call_handlers", None)
        if kernel is None or not isinstance(handlers, dict):
            return  # not a spyder-kernels console
        for name in SPYDER_CALLS:
            original = handlers.get(name)
            if original is None:
                continue
            self._spyder_handlers[name] = original
            handlers[name] = self._guarded(original)
            # publish_state() and other internal callers use the attribute.
            if name not in vars(kernel):
                setattr(kernel, name, self._guarded(original))
                self._spyder_attrs.append(name)
        self._spyder_display.install()

    def _guarded(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.sanitize()
            return original(*args, **kwargs)

        guarded.__shm_kernel_safe_original__ = original  # type: ignore[attr-defined]
        return guarded

    def uninstall(self) -> None:
        if not self.installed:
            return
        for event, callback in self._event_callbacks:
            callbacks = self.shell.events.callbacks.get(event, [])
            if callback in callbacks:
                callbacks.remove(callback)
        self._event_callbacks.clear()
        kernel = getattr(self.shell, "kernel", None)
        handlers = getattr(getattr(kernel, "frontend_comm", None), "_remote_call_handlers", None)
        if isinstance(handlers, dict):
            handlers.update(self._spyder_handlers)
        for name in self._spyder_attrs:
            if kernel is not None and name in vars(kernel):
                delattr(kernel, name)
        self._spyder_handlers.clear()
        self._spyder_attrs.clear()
        self._spyder_display.uninstall()
        self._debugger_guard.uninstall()
        self.installed = False
