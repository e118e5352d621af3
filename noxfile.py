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


#: The kernel tests that need no GUI, for the "Spyder 5's kernel" session.
SPYDER5_KERNEL_TESTS = [
    "tests/test_kernels.py",
    "tests/test_extension_shell.py",
    "tests/test_debugger.py",
    "tests/test_placeholder_display.py",
    "tests/test_worker_warnings.py",
]


@nox.session(name="spyder5-kernel", python="3.10")
def spyder5_kernel(session: nox.Session) -> None:
    """Spyder 5.3.x's kernel: spyder-kernels 2.3.x with IPython 7.34 on 3.10.

    The oldest stack we support, as a Spyder 5 user has it: ``pip check``
    must be clean (our floors must not conflict with spyder-kernels 2.3's
    ``ipython<8`` and ``jupyter-client<8``), then the kernel tests run.
    """
    session.install("-e", ".[test]", "spyder-kernels>=2.3.3,<2.4", "ipython==7.34.0")
    session.run("python", "-m", "pip", "check")
    session.run(
        "python",
        "-c",
        "import sys, IPython, ipykernel, jupyter_client, spyder_kernels; "
        "print(sys.version.split()[0], 'ipython', IPython.__version__, 'ipykernel', "
        "ipykernel.__version__, 'jupyter_client', jupyter_client.__version__, "
        "'spyder-kernels', spyder_kernels.__version__)",
    )
    session.run("python", "-m", "pytest", *(session.posargs or ["-q", *SPYDER5_KERNEL_TESTS]))
