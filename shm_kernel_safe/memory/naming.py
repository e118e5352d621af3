"""Segment names: who made a segment, and nothing an attacker can guess.

A name is ``sks<user>_<pid>_<random>`` in base 36, at most 30 characters
(the macOS limit, see ``_platform.MAX_NAME_CHARS``). The user tag and the
owner's pid let the janitor find segments of dead processes of this user
without any registry file; the random part (>= 60 bits from ``secrets``)
makes names unguessable, and segments are created with mode 0600.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

from .._platform import MAX_NAME_CHARS, current_user_tag, to_base36

PREFIX = "sks"
_NAME_RE = re.compile(rf"^{PREFIX}([0-9a-z]+)_([0-9a-z]+)_([0-9a-z]+)$")


@dataclass(frozen=True)
class ParsedName:
    user_tag: str
    pid: int


def new_name(pid: int | None = None, user_tag: str | None = None) -> str:
    user_tag = current_user_tag() if user_tag is None else user_tag
    pid = os.getpid() if pid is None else pid
    head = f"{PREFIX}{user_tag}_{to_base36(pid)}_"
    room = MAX_NAME_CHARS - len(head)
    if room < 10:
        raise ValueError(f"segment name prefix {head!r} leaves too little room for randomness")
    random_part = to_base36(secrets.randbits(64)).rjust(13, "0")[: min(room, 13)]
    return head + random_part


def parse_name(name: str) -> ParsedName | None:
    """Owner of a segment name, or None if the name is not one of ours."""
    match = _NAME_RE.match(name.lstrip("/"))
    if match is None:
        return None
    return ParsedName(user_tag=match.group(1), pid=int(match.group(2), 36))
