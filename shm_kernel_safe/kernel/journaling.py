"""The magic's journals: on by default, one per loop of a notebook folder.

``%%shm_parallel`` journals every run unless ``--no-journal`` or
``SHM_KERNEL_SAFE_JOURNAL=0``. Its journal's file is named after what the
cell *is* (the folder the kernel runs in, or the notebook's path where the
front end gives it, and the loop: variable, items expression, ``--out``
and ``--result`` names), so that running the cell again finds it. What the
run must match to resume (the cell's code, the items, the values the cell
reads, the ``--out`` arrays) is the engine's check; a journal that fails it
is refused with the flag that discards it.
"""

from __future__ import annotations

import os
from typing import Any

from .._text import human_bytes
from ..engine import journal as journals
from ..errors import JournalError

#: ``SHM_KERNEL_SAFE_JOURNAL=0`` turns the magic's default journal off.
ENV = "SHM_KERNEL_SAFE_JOURNAL"


def journal_for(args: Any, key: tuple, line: str, fn: Any, ns: dict) -> str | None:
    """The ``journal=`` of the run: a path, or None (journaling off).

    ``--journal-reset`` discards the journal first; so does ``--resume``,
    which merges the failed run this kernel kept, whatever the journal
    holds (the engine then records that run's items in a fresh journal).
    The cell's function carries the magic's line, for
    :func:`~shm_kernel_safe.journals`.
    """
    if args.no_journal:
        return None
    if args.journal is None and os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no"):
        return None
    if isinstance(args.journal, str):
        path = os.path.abspath(os.path.expanduser(args.journal))
    else:
        # The notebook, where the front end names it (jupyter_server passes
        # its path to the kernel), else the folder the kernel runs in.
        where = os.environ.get("JPY_SESSION_NAME") or ns.get("__session__") or os.getcwd()
        path = journals.default_path((str(where), key), "cell")
    fn.__shm_journal_label__ = f"%%shm_parallel {line.strip()}"
    if (args.journal_reset or args.resume) and os.path.exists(path):
        try:
            journals.discard_journal(path)
        except JournalError as exc:
            from IPython.core.error import UsageError

            raise UsageError(str(exc)) from None
    return path


def refusal(exc: JournalError) -> str:
    """The magic's one line for a journal it cannot use."""
    if exc.problem == "is in use":
        return str(exc)
    return (
        f"journal {exc.path} {exc.problem}; it is never merged: run the cell with "
        f"--journal-reset to discard it (or see shm_kernel_safe.journals())"
    )


def status_lines() -> list[str]:
    """``%shm_status``'s lines about journals of unfinished runs."""
    found = journals.journals()
    total = sum(j.nbytes for j in found)
    lines = [
        f"Journals of unfinished runs: {len(found)}, {human_bytes(total)}"
        + ("  (shm_kernel_safe.discard_journal(PATH) removes one)" if found else "")
    ]
    lines += [f"  {j.describe()}" for j in found]
    return lines
