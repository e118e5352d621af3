"""Sphinx configuration of the shm_kernel_safe documentation site.

Build: ``python -m pip install -e ".[docs]"`` then
``sphinx-build -W --keep-going -b html docs docs/_build/html``.

The pages are Markdown (MyST); the notebooks in ``notebooks/`` are copied
into ``docs/examples/`` and executed by myst-nb on every build, so each
output shown was produced by this build. The benchmark plot is drawn from
the README's table by ``benchmarks/plot.py`` at build time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, also without an install

import shm_kernel_safe  # noqa: E402

project = "shm_kernel_safe"
author = "shm_kernel_safe developers"
copyright = "2026, shm_kernel_safe developers"
release = shm_kernel_safe.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.graphviz",  # docs/architecture.dot; needs Graphviz's `dot` (Debian: graphviz)
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "jupyter_execute"]
html_theme = "furo"
html_title = f"shm_kernel_safe {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # output lines wrap; API names break at dots

graphviz_output_format = "svg"

# --- MyST / myst-nb -------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # every notebook runs on every build
nb_execution_timeout = 240
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_merge_streams = True
# Pages that reuse README sections start at "##"/"###" under their own "#".
suppress_warnings = ["myst.header"]

# --- API reference ----------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = True
# No intersphinx: the build must not depend on the network (CI has none but
# the package registries), so references to Python's and numpy's objects
# stay plain text.


def _copy_notebooks() -> None:
    """notebooks/*.ipynb -> docs/examples/ (Sphinx reads its source tree only)."""
    target = DOCS / "examples"
    target.mkdir(exist_ok=True)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copyfile(nb, target / nb.name)
    shutil.copyfile(ROOT / "notebooks" / "spyder_console.py", target / "spyder_console.py")


def _benchmark_plot() -> None:
    """docs/_static/bench_<n>.png, one per run in the README's table (benchmarks/plot.py)."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "plot.py"),
            "--readme",
            str(ROOT / "README.md"),
            "--outdir",
            str(DOCS / "_static"),
        ],
        check=True,
    )


def _overwrite_carriage_returns() -> None:
    """Show a text progress bar as a terminal shows it: its last state.

    ``--progress`` falls back to a text bar where no widget frontend is
    attached (as here), redrawing one line with ``\r``. myst-nb's stream
    merging appends a newline to every output chunk before it removes
    overwritten text, so each redraw would be shown as a line of its own.
    Consecutive chunks of a stream are joined first and each line keeps what
    follows its last ``\r``; myst-nb's own merging then runs as before.
    """
    from myst_nb.core import render

    original = render.coalesce_streams

    def coalesce_streams(outputs):
        joined = []
        for output in outputs or []:
            last = joined[-1] if joined else None
            if (
                output.get("output_type") == "stream"
                and last is not None
                and last.get("output_type") == "stream"
                and last.get("name") == output.get("name")
            ):
                last["text"] += output["text"]
            else:
                joined.append(output)
        for output in joined:
            if output.get("output_type") == "stream" and "\r" in output["text"]:
                lines = output["text"].split("\n")
                output["text"] = "\n".join(
                    next((p for p in reversed(line.split("\r")) if p), "") for line in lines
                )
        return original(joined)

    render.coalesce_streams = coalesce_streams


_copy_notebooks()
_benchmark_plot()
_overwrite_carriage_returns()


def _public_bases(app, name, obj, options, bases: list) -> None:
    """Show a private base class as its public bases."""
    expanded: list = []
    for base in bases:
        for b in base.__bases__ if base.__name__.startswith("_") else (base,):
            if b not in expanded:
                expanded.append(b)
    bases[:] = expanded


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
