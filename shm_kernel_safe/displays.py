"""Progress displays for ``progress="auto"`` (``parallel_map``, the magic).

The engine reports ``(done, total)`` at most ten times a second (see
:mod:`shm_kernel_safe.engine.reporting`); a display draws it. This module
sits beside the API, above the engine, so the engine holds no front-end
code while ``parallel_map(..., progress="auto")`` in a notebook still draws
a bar without the extension loaded.

Two displays, chosen by the frontend:

* an ipywidgets bar (done/total, rate, elapsed, ETA) where widgets render:
  JupyterLab, Notebook 7, VS Code. It ends green on success, red with the
  reason on error or interrupt.
* a one-line text bar updated in place everywhere else: Spyder's console,
  qtconsole, terminal IPython, plain scripts.

Both appear only once a run has lasted half a second. Hand-written rather
than ``tqdm.auto``: tqdm decides "notebook" for any ZMQ kernel, which
includes Spyder's and qtconsole's, where a widget cannot render; and its
notebook bar cannot show why a run failed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

SHOW_AFTER = 0.5


def _fmt_seconds(seconds: float) -> str:
    if seconds == float("inf") or seconds != seconds:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class _Progress:
    """Shared timing and rate logic; subclasses draw."""

    def __init__(self, delay: float = SHOW_AFTER) -> None:
        self.start = time.monotonic()
        self.delay = delay
        self.shown = False
        self.done = 0
        self.total = 0

    def stats(self) -> tuple[float, float, float]:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return elapsed, rate, eta

    def summary(self) -> str:
        elapsed, rate, eta = self.stats()
        return (
            f"{self.done}/{self.total}  {rate:,.1f} it/s  elapsed {_fmt_seconds(elapsed)}"
            f"  ETA {_fmt_seconds(eta)}"
        )

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if not self.shown:
            if time.monotonic() - self.start < self.delay:
                return
            self.shown = True
            self.show()
        self.draw()

    def show(self) -> None:  # pragma: no cover - overridden
        pass

    def draw(self) -> None:  # pragma: no cover - overridden
        pass

    def close(self, error: BaseException | None = None, note: str | None = None) -> None:
        """End the display: done, or failed with ``error``; ``note`` ends its last line."""


class TextProgress(_Progress):
    """A one-line bar redrawn in place with a carriage return."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None = None, delay: float = SHOW_AFTER) -> None:
        super().__init__(delay)
        self.stream = stream

    @property
    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def line(self) -> str:
        filled = int(self.WIDTH * self.done / self.total) if self.total else self.WIDTH
        return f"\r[{'#' * filled}{'-' * (self.WIDTH - filled)}] {self.summary()}"

    def draw(self) -> None:
        self._out.write(self.line())
        self._out.flush()

    def close(self, error: BaseException | None = None, note: str | None = None) -> None:
        if not self.shown:
            return
        self.draw()
        reason = f"  failed: {_reason(error)}" if error is not None else "  done"
        if note:
            reason += f"; {note}"
        self._out.write(reason + "\n")
        self._out.flush()


class WidgetProgress(_Progress):
    """An ipywidgets bar; green when done, red with the reason on failure."""

    def __init__(self, delay: float = SHOW_AFTER) -> None:
        super().__init__(delay)
        import ipywidgets as widgets  # imported here: optional at run time

        self.bar = widgets.IntProgress(
            min=0,
            max=1,
            value=0,
            bar_style="info",
            description="shm_parallel",
            style={"description_width": "initial"},
        )
        self.label = widgets.HTML(value="")
        self.box = widgets.HBox([self.bar, self.label])

    def show(self) -> None:
        from IPython.display import display

        display(self.box)

    def draw(self) -> None:
        self.bar.max = max(self.total, 1)
        self.bar.value = self.done
        self.label.value = f"<code>{self.summary()}</code>"

    def close(self, error: BaseException | None = None, note: str | None = None) -> None:
        if not self.shown:
            return
        self.draw()
        if error is None:
            self.bar.bar_style = "success"
            if note:
                self.label.value += f" <b>done</b>; {note}"
        else:
            self.bar.bar_style = "danger"
            self.label.value = f"<code>{self.summary()}</code> <b>failed:</b> {_reason(error)}"


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def frontend_renders_widgets(shell: Any = None, environ: dict[str, str] | None = None) -> bool:
    """Whether the frontend of this kernel can render ipywidgets.

    Spyder's console and qtconsole run a ZMQ kernel too, but draw no
    widgets; the kernel cannot ask its frontend, so we read what launched it:
    jupyter_server sets ``JPY_SESSION_NAME`` for JupyterLab / Notebook 7
    kernels, VS Code sets ``VSCODE_PID``.
    """
    environ = os.environ if environ is None else environ
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None or type(shell).__name__ not in ("ZMQInteractiveShell", "SpyderShell"):
        return False
    if type(shell).__module__.startswith("spyder_kernels") or "SPY_PYTHONPATH" in environ:
        return False
    return "JPY_SESSION_NAME" in environ or "VSCODE_PID" in environ


def make_progress(mode: str) -> _Progress | None:
    """A progress display for ``mode`` (one of ``PROGRESS_MODES``, checked by the run)."""
    if mode == "none":
        return None
    if mode == "widget" or (mode == "auto" and frontend_renders_widgets()):
        try:
            return WidgetProgress()
        except ImportError:  # ipywidgets missing: text, and no traceback
            return TextProgress()
    return TextProgress()
