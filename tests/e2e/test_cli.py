"""The command line as users meet it: help, version, subcommands, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import shm_kernel_safe

pytestmark = pytest.mark.timeout(60)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shm_kernel_safe", *args],
        capture_output=True,
        text=True,
        timeout=50,
    )


def test_help_lists_every_command_and_the_exit_codes():
    res = cli("--help")
    assert res.returncode == 0, res.stderr
    for word in ("demo", "status", "cleanup", "--version", "exit codes"):
        assert word in res.stdout


def test_version_is_the_package_version():
    res = cli("--version")
    assert res.returncode == 0
    assert res.stdout.strip().endswith(shm_kernel_safe.__version__)


@pytest.mark.parametrize("command", ["demo", "status", "cleanup"])
def test_each_command_has_its_own_help(command):
    res = cli(command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: python -m shm_kernel_safe {command}")


@pytest.mark.parametrize("args", [["bogus"], ["status", "--bogus"], ["demo", "--bogus"]])
def test_usage_errors_exit_2_with_a_message(args):
    res = cli(*args)
    assert res.returncode == 2
    assert "usage:" in res.stderr and res.stdout == ""


def test_status_reports_on_stale_segments():
    res = cli("status")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


def test_the_demo_explains_a_loss_instead_of_a_bare_ratio(monkeypatch):
    """A demo run slower than the loop says why: load first (it spoils
    every other number), then the run's own PerformanceHint, else the
    items' size."""
    from shm_kernel_safe import _platform, demo

    monkeypatch.setattr(_platform, "usable_cpus", lambda: 2)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert "busy (load average 3.0 on 2 CPUs)" in demo.why_slower(1.0, "the hint")
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert demo.why_slower(1.0, "the hint").endswith("copying x: the hint")
    assert "try more --rows" in demo.why_slower(1.0, None)
