"""The test matrix: one fresh virtual environment per Python version present.

    nox                          # every interpreter found
    nox -s tests-3.10            # one of them
    nox -s tests-3.13 -- tests/test_engine.py   # a subset

Interpreters are found on PATH and, where pyenv is used, in pyenv's versions
folder (pyenv's shims only answer for the selected version). A missing
interpreter is skipped with a message, also on CI.
"""

from __future__ import annotations

import glob
import os

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["tests"]

_pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
for version in PYTHONS:
    for bindir in sorted(glob.glob(os.path.join(_pyenv_root, "versions", f"{version}.*", "bin"))):
        if bindir not in os.environ.get("PATH", ""):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Install the package with its test extras and run the suite."""
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-c",
        "import sys, numpy, IPython; print(sys.version.split()[0], "
        "'numpy', numpy.__version__, 'ipython', IPython.__version__)",
    )
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
