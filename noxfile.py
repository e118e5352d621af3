"""The test matrix: one fresh virtual environment per Python version present.

    nox                          # every interpreter found
    nox -s tests-3.10            # one of them
    nox -s tests-3.13 -- tests/engine/test_engine.py   # a subset

Interpreters are found on PATH and, where pyenv is used, in pyenv's versions
folder (pyenv's shims only answer for the selected version). A missing
interpreter is skipped with a message, also on CI.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

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
    "tests/kernel/test_kernels.py",
    "tests/kernel/test_extension_shell.py",
    "tests/kernel/test_debugger.py",
    "tests/kernel/test_placeholder_display.py",
    "tests/engine/test_worker_warnings.py",
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


@nox.session(python=False)
def release(session: nox.Session) -> None:
    """Build the sdist and the wheel, check them, and tag the release.

    ``nox -s release`` builds into ``dist/`` and checks: the metadata renders
    on an index (``twine check --strict``), the wheel's contents
    (``check-wheel-contents``), the version is released in CHANGELOG.md
    (a ``## [X.Y.Z] - YYYY-MM-DD`` heading with its link definition) and is
    not a development version. ``nox -s release -- --tag`` then makes the
    annotated tag ``vX.Y.Z``. Uploading is left to a person: the project
    has no index account or public address yet.
    """
    import re
    import shutil
    import subprocess
    import sys

    session.run(sys.executable, "-m", "pip", "install", "-q", "build", "twine",
                "check-wheel-contents")  # fmt: skip
    version = subprocess.run(
        [sys.executable, "-c", "import shm_kernel_safe; print(shm_kernel_safe.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if re.search(r"(dev|a|b|rc)\d*$", version):
        session.error(f"version {version} is a pre-release; set __version__ first")
    changelog = Path("CHANGELOG.md").read_text(encoding="utf-8")
    if not re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M):
        session.error(f"CHANGELOG.md has no '## [{version}] - YYYY-MM-DD' section")
    if not re.search(rf"^\[{re.escape(version)}\]: ", changelog, re.M):
        session.error(f"CHANGELOG.md has no link definition for [{version}]")
    shutil.rmtree("dist", ignore_errors=True)
    session.run(sys.executable, "-m", "build", "-o", "dist", ".")
    session.run(sys.executable, "-m", "twine", "check", "--strict", *_dist_files())
    session.run("check-wheel-contents", *[f for f in _dist_files() if f.endswith(".whl")])
    if "--tag" in session.posargs:
        session.run("git", "tag", "-a", f"v{version}", "-m", f"shm_kernel_safe {version}",
                    external=True)  # fmt: skip


def _dist_files() -> list[str]:
    return sorted(glob.glob("dist/*"))
