"""Make a :class:`~shm_kernel_safe.kernel.inspection.DanglingArray` row say what
happened in Spyder's Variable Explorer.

JupyterLab's Variable Inspector and VS Code's variable viewer show ``str()``
of a value, which the placeholder answers itself. Spyder's kernel builds the
Value column with ``spyder_kernels.utils.nsview.value_to_display``, which
shows text only for types it knows and ``"<Type> object of <module> module"``
for everything else. So, in a spyder-kernels console, we wrap that function
(looked up as a module global by ``make_remote_view`` and by the collection
displays, in spyder-kernels 2.3+ and 3.x) so that a placeholder shows its
:meth:`~shm_kernel_safe.kernel.inspection.DanglingArray.describe` text and a
background run's handle its one-line repr, and every other value goes to
Spyder's own function unchanged. The wrapper is removed
exactly at ``%unload_ext``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

NSVIEW = "spyder_kernels.utils.nsview"


#: Class attribute that marks the placeholder type (set by ``inspection``,
#: which imports this module: a marker instead of an import keeps them acyclic).
MARKER = "_shm_kernel_safe_placeholder_"
#: Class attribute of our other types whose one-line ``repr`` is their row
#: (a background run's handle: ``<run 5230/8760 items, 1m12s left>``).
ROW_MARKER = "_shm_kernel_safe_row_"


def _describe(value: Any) -> str | None:
    """The placeholder's text, a run handle's repr, or None for any other value."""
    if getattr(type(value), MARKER, False):
        return value.describe()
    if getattr(type(value), ROW_MARKER, False):
        return repr(value)
    return None


class SpyderDisplay:
    """Installs and removes the ``value_to_display`` wrapper.

    Installing is a no-op outside a spyder-kernels process (the module is
    not imported) and when already installed.
    """

    def __init__(self) -> None:
        self._module: Any = None
        self._original: Callable[..., Any] | None = None
        self._wrapper: Callable[..., Any] | None = None

    @property
    def installed(self) -> bool:
        """Whether the wrapper is in place."""
        return self._wrapper is not None

    def install(self) -> None:
        """Wrap Spyder's ``value_to_display`` if spyder-kernels is loaded."""
        if self._wrapper is not None:
            return
        module = sys.modules.get(NSVIEW)
        original = getattr(module, "value_to_display", None)
        if original is None:
            return

        def value_to_display(value: Any, *args: Any, **kwargs: Any) -> Any:
            text = _describe(value)
            return original(value, *args, **kwargs) if text is None else text

        value_to_display.__wrapped__ = original  # type: ignore[attr-defined]
        module.value_to_display = value_to_display
        self._module, self._original, self._wrapper = module, original, value_to_display

    def uninstall(self) -> None:
        """Put Spyder's own function back (only if ours is still the one there)."""
        if self._wrapper is None:
            return
        if getattr(self._module, "value_to_display", None) is self._wrapper:
            self._module.value_to_display = self._original
        self._module = self._original = self._wrapper = None
