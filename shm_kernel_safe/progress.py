"""Progress of a run, read from the workers' shared counters by the parent.

The engine calls ``progress(done, total)`` at most ten times a second from
the parent's wait loop; workers never send a message per item. ``auto``
chooses a text bar for now (the widget bar comes with the progress issue).
"""

from __future__ import annotations

import sys
import time

PROGRESS_MODES = ("auto", "widget", "text", "none")


class TextProgress:
    """A one-line bar updated in place; shown after half a second only."""

    def __init__(self, stream=None, delay: float = 0.5) -> None:
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self.delay = delay
        self.shown = False
        self.last = (0, 0)

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        elapsed = time.monotonic() - self.start
        if elapsed < self.delay and done < total:
            return
        self.shown = True
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        eta_text = f"{eta:5.1f}s" if eta != float("inf") else "   ?s"
        self.stream.write(
            f"\r[{bar}] {done}/{total} {rate:8.1f} it/s  elapsed {elapsed:5.1f}s  eta {eta_text}"
        )
        self.stream.flush()

    def close(self, error: BaseException | None = None) -> None:
        if not self.shown:
            return
        if error is not None:
            self.stream.write(f"  stopped: {type(error).__name__}\n")
        else:
            self.stream.write("\n")
        self.stream.flush()


def make_progress(mode: str) -> TextProgress | None:
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {mode!r}")
    if mode == "none":
        return None
    return TextProgress()
