"""Every shell command the docs quote is one that works.

The ``bash`` blocks of ``docs/*.md`` and the README are read line by line
(``&&`` chains split). Each command is checked the cheapest way that proves
it would run: installs against the extras ``pyproject.toml`` defines (and,
for requirements from the index, a ``pip download --no-deps`` of them), our
command line and the benchmark scripts against their own ``--help``, pytest
by collecting, nox by listing its sessions. A command no rule knows fails
the test, unless the docs mark it ``# not run: <why>``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
EXTRAS = set(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def quoted_commands() -> list[tuple[str, str]]:
    """(page, command) for each command in a ``bash`` block, in page order."""
    found: dict[str, str] = {}
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                if "# not run:" in line:
                    continue
                line = re.sub(r"\s+#.*$", "", line).strip()
                if not line or line.startswith("#"):
                    continue
                for command in line.split("&&"):
                    found.setdefault(command.strip(), page.name)
    return [(page, command) for command, page in found.items()]


def run(*argv: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(argv), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--")]


def check_pip_install(words: list[str]) -> None:
    requirements = [w for w in words if not w.startswith("-")]
    for req in requirements:
        local = re.fullmatch(r"(\.|dist/[^\[]+)(?:\[(.+)\])?", req)
        if local:
            unknown = set((local.group(2) or "").split(",")) - EXTRAS - {""}
            assert not unknown, f"{req}: pyproject.toml has no extra {sorted(unknown)}"
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, req)
        assert res.returncode == 0, f"{req} is not on the index: {res.stderr[-500:]}"


def check_against_help(argv: list[str], words: list[str]) -> None:
    res = run(*argv, "--help")
    assert res.returncode == 0, res.stderr[-1000:]
    missing = [f for f in flags(words) if f not in res.stdout]
    assert not missing, f"{' '.join(argv)} has no option {missing}"


def check(command: str) -> None:
    words = shlex.split(command)
    if words[:4] == ["python", "-m", "pip", "install"]:
        check_pip_install(words[4:])
    elif words[:3] == ["python", "-m", "shm_kernel_safe"]:
        sub = [w for w in words[3:] if not w.startswith("-")][:1]
        check_against_help([sys.executable, "-m", "shm_kernel_safe", *sub], words[3:])
    elif words[:3] == ["python", "-m", "pytest"]:
        res = run(sys.executable, "-m", "pytest", "--collect-only", "-q", *words[3:])
        assert res.returncode == 0, res.stdout[-1000:]
    elif words[0] == "python" and words[1].startswith("benchmarks/"):
        check_against_help([sys.executable, words[1]], words[2:])
    elif words[:3] == ["python", "-m", "build"]:
        pytest.importorskip("build")
    elif words[0] == "nox":
        res = run(sys.executable, "-m", "nox", "-l")
        assert res.returncode == 0, res.stderr[-1000:]
        for i, word in enumerate(words):
            if word == "-s":
                listed = re.findall(r"^[*-] (\S+)", res.stdout, re.M)
                assert words[i + 1] in listed, f"nox has no session {words[i + 1]}"
    elif words[0] == "sphinx-build":
        pytest.importorskip("sphinx")  # the docs extra; stage 7 of .ci/run builds the site
        assert (ROOT / words[-2] / "conf.py").exists()
    else:
        pytest.fail(f"no rule checks {command!r}: add one here, or mark it `# not run: why`")


@pytest.mark.parametrize(("page", "command"), quoted_commands())
def test_quoted_command_works(page, command):
    check(command)


def test_the_readme_quotes_the_two_set_up_commands():
    commands = [c for _, c in quoted_commands()]
    assert "python -m shm_kernel_safe demo" in commands
    assert "python -m pytest" in commands


def test_the_readme_links_nothing_relative():
    # It is the package's long description: on an index page a relative link
    # or image leads nowhere.
    readme = (ROOT / "README.md").read_text()
    relative = [t for t in re.findall(r"\]\(([^)]+)\)", readme) if "://" not in t]
    assert not relative, f"relative links in README.md: {relative}"
