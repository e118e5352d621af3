"""Warnings that point at the user's code, not at this package's frames.

``warnings.warn(..., stacklevel=2)`` from ``parallel_map`` points at its
caller, which is right for a direct call and wrong from the magic: there
the caller is the magic's own module, and IPython's dispatch frames sit
between it and the cell. The user's frame is the first one outside this
package and outside IPython's magic machinery: the cell that ran
``%%shm_parallel``, or the line that called ``parallel_map``.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _is_internal(filename: str) -> bool:
    if filename.startswith(_PACKAGE) or filename.startswith("<decorator-gen-"):
        return True
    parts = filename.replace("\\", "/").split("/")
    return "IPython" in parts and "core" in parts  # the magic's dispatch


def warn_at_caller(warning: Warning) -> None:
    """Issue ``warning`` at the first frame of user code up the stack.

    Parameters
    ----------
    warning : Warning
        The warning instance; the user's warning filters apply to it at
        that frame's module and line, as for any ``warnings.warn``.
    """
    level = 2  # stacklevel=2 is this function's caller: sys._getframe(1)
    frame = sys._getframe(1)
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    if frame is None:  # called from this package only (tests of internals)
        level = 2
    warnings.warn(warning, stacklevel=level)
