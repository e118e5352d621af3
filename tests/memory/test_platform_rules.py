"""Platform rules are pure functions: every branch runs here, on Linux."""

from __future__ import annotations

import os
import re

import pytest

from shm_kernel_safe import _platform as P
from shm_kernel_safe.memory import naming


@pytest.mark.parametrize(
    ("platform", "directory", "unlinks", "start"),
    [
        ("linux", "/dev/shm", True, "forkserver"),
        ("darwin", None, True, "spawn"),
        ("win32", None, False, "spawn"),
    ],
)
def test_platform_table(platform, directory, unlinks, start):
    assert P.shm_directory(platform) == directory
    assert P.unlink_frees_name(platform) is unlinks
    assert P.default_start_method(platform) == start
    assert start in P.available_start_methods(platform)


def test_windows_has_only_spawn():
    assert P.available_start_methods("win32") == ("spawn",)


def test_mapping_size_never_zero():
    assert P.mapping_size(0) == 1
    assert P.mapping_size(17) == 17


def test_user_tag_windows_branch_is_stable():
    tag = P.current_user_tag("win32")
    assert tag == P.current_user_tag("win32")
    assert re.fullmatch(r"[0-9a-z]+", tag)


def test_base36():
    assert P.to_base36(0) == "0"
    assert P.to_base36(35) == "z"
    assert P.to_base36(36) == "10"
    assert int(P.to_base36(4_194_304), 36) == 4_194_304
    with pytest.raises(ValueError):
        P.to_base36(-1)


def test_names_fit_macos_and_roundtrip():
    worst = naming.new_name(pid=4_194_304, user_tag=P.to_base36(2**32 - 1))
    assert len(worst) <= P.MAX_NAME_CHARS
    name = naming.new_name()
    parsed = naming.parse_name(name)
    assert parsed is not None and parsed.pid == os.getpid()
    assert parsed.user_tag == P.current_user_tag()
    assert naming.parse_name("/" + name) == parsed
    assert naming.parse_name("psm_12345") is None


def test_names_are_unguessable():
    names = {naming.new_name() for _ in range(2000)}
    assert len(names) == 2000
    random_parts = [n.rsplit("_", 1)[1] for n in names]
    assert min(len(p) for p in random_parts) >= 12  # >= 60 bits
