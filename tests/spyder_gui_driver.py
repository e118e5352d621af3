"""Run the real Spyder application and drive its IPython console.

Started by ``tests/e2e/test_spyder_gui.py`` in its own process (Spyder's
configuration, ``sys.exit`` patch and atexit handlers stay out of pytest):

    python tests/spyder_gui_driver.py OUT_DIR {with,without}

It sets the preferences a user would (Startup > Run code > Lines, Show
arrays min/max), starts Spyder's main window as ``spyder --new-instance
--conf-dir OUT_DIR/conf`` does, and steps a scenario from a QTimer inside
Spyder's own event loop (a driver that blocks while Spyder spins a nested
event loop for one of its blocking comm calls would deadlock it). Cells go
through ``ShellWidget.execute``, as Run cell does; the Variable Explorer is
read through its Qt model, the text a user sees, in a landscape window
where its Value column shows whole. What it saw goes to
``OUT_DIR/result.json``, with a screenshot of the window at each check
(``OUT_DIR/*.png``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

OUT = os.path.abspath(sys.argv[1])
MODE = sys.argv[2]  # "with": the extension in the startup lines; "without": not
CONF_DIR = os.path.join(OUT, "conf")
os.makedirs(CONF_DIR, exist_ok=True)
os.environ["SPYDER_CONFDIR"] = CONF_DIR
os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")  # root in CI
sys.argv = ["spyder", "--new-instance", "--conf-dir", CONF_DIR]

# The window: landscape, as on a laptop screen, inside the test's Xvfb
# screen; the Variable Explorer, above the console, wide enough for a whole
# row, Value column included. Drawn at twice the pixels (Spyder's own
# "custom high DPI scaling"), so the screenshots stay readable where the
# docs scale them down.
WINDOW_SIZE = (1200, 840)
VE_SHARE = 0.5  # of the height the Variable Explorer and the console share
SCALE_FACTOR = "2"

from spyder.config.manager import CONF  # noqa: E402 (after SPYDER_CONFDIR)

CONF.set("main", "check_updates_on_startup", False)
CONF.set("tours", "show_tour_message", False)
CONF.set("variable_explorer", "minmax", True)
CONF.set("main", "high_dpi_custom_scale_factor", True)
CONF.set("main", "high_dpi_custom_scale_factors", SCALE_FACTOR)
CONF.set(
    "ipython_console", "startup/run_lines", "%load_ext shm_kernel_safe" if MODE == "with" else ""
)
for _plugin in ("completions", "help", "onlinehelp"):  # not needed; saves CPU
    CONF.set(_plugin, "enable", False)

from qtpy.QtCore import Qt, QTimer  # noqa: E402
from qtpy.QtGui import QFont, QFontMetrics  # noqa: E402
from spyder.api.plugins import Plugins  # noqa: E402
from spyder.app import mainwindow, start  # noqa: E402

# The original question's code, as typed in the console: the views outlive
# close + unlink. Unprotected, the Variable Explorer's min/max after this
# cell reads unmapped memory: the kernel dies.
SEED = """\
import numpy as np
from multiprocessing import shared_memory
x = np.random.default_rng(0).standard_normal((200_000, 16))
shm = shared_memory.SharedMemory(create=True, size=x.nbytes)
x_shared = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf)
x_shared[:] = x
x_hour = x_shared[5]
shm.close()
shm.unlink()
"""
SEED_CHECK = "print('seed sum agrees:', float(x_shared.sum()) == float(x.sum()))\n"

# An array whose memory was unmapped behind any close we can intercept.
LOST = """\
import mmap
_mm = mmap.mmap(-1, 8 * 200_000 * 16)
lost = np.ndarray((200_000, 16), np.float64, buffer=_mm)
lost[:] = 1.0
_mm.close()
del _mm
"""

PARALLEL_DEFS = "y = np.zeros(300)\n"
PARALLEL = """\
%%shm_parallel nn in range(300) --out y -n 2
if nn == 7:
    print("worker prints item", nn)
y[nn] = float(x[nn].sum())
"""
PARALLEL_CHECK = "print('parallel y agrees:', bool(np.allclose(y, x[:300].sum(axis=1))))\n"

# A background run: the console is free at once, and the Variable
# Explorer shows the run handle's one-line repr while it runs (~6 s).
BACKGROUND = """\
%%shm_parallel nn in range(600) --background -r bg -n 2
__import__("time").sleep(0.02)
float(x[nn].sum())
"""
BACKGROUND_CHECK = "print('background bg agrees:', bool(np.allclose(bg, x[:600].sum(axis=1))))\n"

EXTENSION_CHECK = (
    "print('extension loaded:', 'shm_kernel_safe' in get_ipython().extension_manager.loaded)\n"
)


class Scenario:
    """Steps the checks; each ``yield`` names a condition to wait for."""

    def __init__(self, main) -> None:
        self.main = main
        self.result: dict = {"mode": MODE, "steps": [], "checks": {}, "error": None}
        self.ipy = main.get_plugin(Plugins.IPythonConsole)
        self.ve = main.get_plugin(Plugins.VariableExplorer)
        self.sentinels = 0
        self.start_pids: list[int] | None = None
        self.steps = self.run()
        self.waiting = None
        self.deadline = 0.0
        self.timer = QTimer()
        self.timer.timeout.connect(self.tick)
        self.timer.start(100)
        self.t0 = time.monotonic()

    # -- helpers --------------------------------------------------------------
    @property
    def shell(self):
        return self.ipy.get_current_shellwidget()

    def console_text(self) -> str:
        shell = self.shell
        return shell._control.toPlainText() if shell is not None else ""

    def kernel_pids(self) -> list[int]:
        import psutil

        pids = []
        for child in psutil.Process().children(recursive=True):
            try:
                if "spyder_kernels.console" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:
                pass
        return sorted(pids)

    def kernel_died(self) -> bool:
        """Spyder restarts a dead kernel: a new pid, and its message or the
        faulthandler dump in the console."""
        if self.start_pids is not None and self.kernel_pids() != self.start_pids:
            return True
        text = self.console_text()
        return "The kernel died" in text or "Fatal Python error" in text

    def run_cell(self, code: str):
        """Execute ``code`` as Run cell does, then a sentinel print; wait for
        the sentinel (the cell is done) or the kernel's death."""
        self.sentinels += 1
        mark = f"sks-done-{self.sentinels}"
        self.shell.execute(code)
        # built at run time, so the echoed input does not contain the mark
        self.shell.execute(f"print('sks-' + 'done-{self.sentinels}')")
        return (
            lambda: self.console_text().count(mark) >= 1 or self.kernel_died(),
            90,
            f"cell {self.sentinels}: {code.splitlines()[0]}",
        )

    def variable_rows(self) -> dict[str, dict[str, str]]:
        """The Variable Explorer's rows as displayed: name -> column texts."""
        editor = self.ve.current_widget().editor
        model = editor.model()
        headers = [
            str(model.headerData(c, Qt.Horizontal, Qt.DisplayRole))
            for c in range(model.columnCount())
        ]
        rows = {}
        for r in range(model.rowCount()):
            texts = [
                str(model.data(model.index(r, c), Qt.DisplayRole))
                for c in range(model.columnCount())
            ]
            rows[texts[0]] = dict(zip(headers, texts, strict=False))
        return rows

    def landscape(self) -> None:
        """Give the window ``WINDOW_SIZE`` and close the Editor pane.

        Spyder's default layout maximizes the window, which means nothing
        without a window manager (Xvfb has none): the window then takes the
        size its panes ask for, tall and narrow, with the Variable
        Explorer's Value column cut off. The Editor pane is closed as a user
        who works in the console does (Window > Panes > Editor): its file
        path label alone asks for half the window's width, and the Variable
        Explorer would share the other half with the console; without it
        they take the whole width.
        """
        self.main.showNormal()
        self.main.setGeometry(0, 0, *WINDOW_SIZE)
        self.main.get_plugin(Plugins.Editor).toggle_view(False)

    def share_column(self) -> None:
        """The Variable Explorer above, with ``VE_SHARE`` of the height (room
        for every row of the scenario), the console below. Done once the
        window and its docks have their new sizes: ``resizeDocks`` shares
        out the height the laid out docks have, in proportion to the sizes
        it is given."""
        share = round(1000 * VE_SHARE)
        self.main.resizeDocks(
            [self.ve.dockwidget, self.ipy.dockwidget], [share, 1000 - share], Qt.Vertical
        )

    def value_fits(self, name: str) -> bool:
        """Whether row ``name``'s Value cell shows its whole text: inside the
        table's visible area and at least as wide as the text."""
        editor = self.ve.current_widget().editor
        model = editor.model()
        headers = [
            str(model.headerData(c, Qt.Horizontal, Qt.DisplayRole))
            for c in range(model.columnCount())
        ]
        column = headers.index("Value")
        for row in range(model.rowCount()):
            if str(model.data(model.index(row, 0), Qt.DisplayRole)) == name:
                index = model.index(row, column)
                break
        else:
            return False
        font = model.data(index, Qt.FontRole)
        metrics = QFontMetrics(font) if isinstance(font, QFont) else editor.fontMetrics()
        needed = metrics.horizontalAdvance(str(model.data(index, Qt.DisplayRole)))
        cell = editor.visualRect(index)
        visible = editor.viewport().rect()
        return (
            cell.width() >= needed
            and visible.left() <= cell.left()
            and cell.right() <= visible.right()
        )

    def screenshot(self, name: str) -> None:
        self.main.grab().save(os.path.join(OUT, f"{name}.png"))

    def note(self, step: str) -> None:
        self.result["steps"].append(f"{time.monotonic() - self.t0:6.1f}s {step}")

    # -- the scenario ---------------------------------------------------------
    def run(self):
        checks = self.result["checks"]
        yield (
            lambda: (
                self.shell is not None
                and self.shell.spyder_kernel_ready
                and self.shell._prompt_html is not None
                and not self.shell._executing
            ),
            120,
            "console ready",
        )
        self.landscape()
        yield (lambda: False, 0.5, None)  # a pause: the new sizes reach the layout
        self.share_column()
        self.ve.switch_to_plugin()  # the Variable Explorer visible, as users have it
        yield (lambda: False, 0.5, None)
        checks["window_size"] = [self.main.width(), self.main.height()]
        checks["pane_heights"] = [self.ve.dockwidget.height(), self.ipy.dockwidget.height()]
        checks["kernel_pids_at_start"] = self.start_pids = self.kernel_pids()
        yield self.run_cell(EXTENSION_CHECK)
        checks["extension_loaded"] = "extension loaded: True" in self.console_text()
        yield self.run_cell(SEED)
        yield (self.kernel_died, 3.0, None)  # a Variable Explorer refresh that kills
        checks["kernel_died_after_seed"] = self.kernel_died()
        checks["kernel_pids_after_seed"] = self.kernel_pids()
        self.screenshot("after_seed")
        if MODE == "without" or self.kernel_died():
            return
        yield self.run_cell(SEED_CHECK)
        checks["seed_sum_agrees"] = "seed sum agrees: True" in self.console_text()
        yield (
            lambda: {"x_shared", "x_hour"} <= set(self.variable_rows()),
            30,
            "seed rows in the Variable Explorer",
        )
        yield self.run_cell(LOST)
        yield (
            lambda: "lost" in self.variable_rows(),
            30,
            "placeholder row in the Variable Explorer",
        )
        yield self.run_cell(PARALLEL_DEFS)
        yield self.run_cell(PARALLEL)
        yield self.run_cell(PARALLEL_CHECK)
        yield (lambda: "y" in self.variable_rows(), 30, "y row")
        text = self.console_text()
        checks["worker_print_seen"] = "worker prints item 7" in text
        checks["parallel_agrees"] = "parallel y agrees: True" in text
        yield self.run_cell(BACKGROUND)
        yield self.run_cell("during_background = 1\n")  # a refresh while it runs
        yield (
            lambda: self.variable_rows().get("bg", {}).get("Value", "").startswith("<run "),
            30,
            "the run handle's row while it runs",
        )
        checks["background_row"] = self.variable_rows()["bg"]
        checks["background_value_fits"] = self.value_fits("bg")
        self.screenshot("background_run")
        yield self.run_cell("%shm_wait bg\n")
        yield self.run_cell(BACKGROUND_CHECK)  # bg is the results from this cell on
        checks["background_agrees"] = "background bg agrees: True" in self.console_text()
        checks["rows"] = self.variable_rows()
        checks["kernel_died_at_end"] = self.kernel_died()
        checks["kernel_pids_at_end"] = self.kernel_pids()
        self.screenshot("end")

    def tick(self) -> None:
        try:
            if self.waiting is not None:
                condition, step = self.waiting
                if condition():
                    self.note(f"ok: {step}")
                elif time.monotonic() > self.deadline:
                    if step is None:  # a plain pause
                        pass
                    else:
                        raise TimeoutError(f"gave up waiting for: {step}")
                else:
                    return
            condition, timeout, step = next(self.steps)
            self.waiting = (condition, step)
            self.deadline = time.monotonic() + timeout
        except StopIteration:
            self.finish()
        except Exception:
            self.result["error"] = traceback.format_exc()
            self.finish()

    def finish(self) -> None:
        self.timer.stop()
        try:
            self.result["console"] = self.console_text()
            self.screenshot("final")
        except Exception:
            self.result["error"] = (self.result["error"] or "") + traceback.format_exc()
        with open(os.path.join(OUT, "result.json"), "w") as fh:
            json.dump(self.result, fh, indent=1)
        # shut the kernel down as closing the console does, then leave
        with contextlib.suppress(Exception):
            self.ipy.get_widget().close_all_clients()
        QTimer.singleShot(2000, lambda: os._exit(0))


_original_post_visible_setup = mainwindow.MainWindow.post_visible_setup


def _post_visible_setup(self, *args, **kwargs):
    result = _original_post_visible_setup(self, *args, **kwargs)
    self._sks_scenario = Scenario(self)
    return result


mainwindow.MainWindow.post_visible_setup = _post_visible_setup

if __name__ == "__main__":
    start.main()
