"""Guard the JupyterLab debugger's Variables panel.

With the debugger enabled, JupyterLab (and any DAP client of ipykernel)
reads the namespace over the *control* channel: ``debug_request`` messages
``inspectVariables`` (the Variables panel, after each cell), ``variables``
(expanding a variable) and ``richInspectVariables`` (its rich view). ipykernel
answers them from its control thread, with no IPython event around them, as
Spyder's comm calls are answered; debugpy's representation of an ndarray
reads its memory, so an array whose shared memory was unmapped kills the
kernel there. This puts the sanitizer in front of those handlers, in
ipykernel's ``Debugger`` handler tables, and removes exactly that at
``%unload_ext``.

``variables`` answers from the objects debugpy tracked at the last
``inspectVariables``, not from the namespace. When the sanitizer replaced
something since, those references may hold the dangling array itself, so the
tracking is renewed first, as ``inspectVariables`` does; a reference the
client kept from before then answers with no children instead of a crash.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

#: Debug requests that read the namespace without an IPython event.
GUARDED_COMMANDS = ("inspectVariables", "richInspectVariables", "variables")


class DebuggerGuard:
    """Wraps ipykernel's debugger handlers for :data:`GUARDED_COMMANDS`.

    Parameters
    ----------
    sanitize : callable
        Called with no argument before each guarded request; returns the
        list of paths it replaced (see ``inspection.sanitize_namespace``).
    """

    def __init__(self, sanitize: Callable[[], list[str]]) -> None:
        self.sanitize = sanitize
        self._debugger: Any = None
        self._originals: dict[tuple[str, str], Callable[..., Any]] = {}

    def install(self, kernel: Any) -> bool:
        """Wrap the handlers of ``kernel.debugger``; False where there is none
        (debugpy missing, not an ipykernel)."""
        debugger = getattr(kernel, "debugger", None)
        if debugger is None or self._debugger is not None:
            return False
        for table_name in ("static_debug_handlers", "started_debug_handlers"):
            table = getattr(debugger, table_name, None)
            if not isinstance(table, dict):
                continue
            for command in GUARDED_COMMANDS:
                original = table.get(command)
                if original is None:
                    continue
                self._originals[(table_name, command)] = original
                table[command] = self._guarded(debugger, command, original)
        self._debugger = debugger
        return bool(self._originals)

    def _guarded(self, debugger: Any, command: str, original: Callable[..., Any]) -> Any:
        @functools.wraps(original)
        async def guarded(message: dict) -> Any:
            replaced = self.sanitize()
            if command == "variables" and not getattr(debugger, "stopped_threads", True):
                if replaced:
                    _retrack(debugger)
                try:
                    return await original(message)
                except KeyError:  # a reference from before the renewal
                    return debugger._build_variables_response(message, [])
            return await original(message)

        guarded.__shm_kernel_safe_original__ = original  # type: ignore[attr-defined]
        return guarded

    def uninstall(self) -> None:
        """Put ipykernel's own handlers back (where ours are still in place)."""
        debugger = self._debugger
        for (table_name, command), original in self._originals.items():
            table = getattr(debugger, table_name, None)
            current = table.get(command) if isinstance(table, dict) else None
            if getattr(current, "__shm_kernel_safe_original__", None) is original:
                table[command] = original
        self._originals.clear()
        self._debugger = None


def _retrack(debugger: Any) -> None:
    """Renew debugpy's tracking of the namespace, as ``inspectVariables`` does."""
    explorer = getattr(debugger, "variable_explorer", None)
    if explorer is None:
        return
    explorer.untrack_all()
    fresh = type(explorer)()
    fresh.track()
    debugger.variable_explorer = fresh
