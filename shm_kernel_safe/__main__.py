"""Command line: ``python -m shm_kernel_safe`` (or the ``shm-kernel-safe`` script).

Exit codes: 0 success; 1 the demo's results disagreed or it left segments
behind; 2 a usage error (unknown command or option).
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
exit codes:
  0  success
  1  demo: results disagreed or segments were left in /dev/shm
  2  usage error (unknown command or option)

Run `python -m shm_kernel_safe COMMAND --help` for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one subcommand per job, each with its own ``--help``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m shm_kernel_safe",
        description="Big-array multiprocessing that is safe inside Jupyter and Spyder kernels.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Listed here for the overview; the demo parses its own options
    # (shm_kernel_safe.demo), so that `demo --help` lists them.
    commands.add_parser(
        "demo",
        help="run the seed scenario: the safety check, then parallel vs serial (default)",
        add_help=False,
    )
    commands.add_parser(
        "status",
        help="list shared-memory segments left by processes of this user that are gone, "
        "and journals of unfinished runs",
        description="List segments in /dev/shm whose owner process is gone, and the journals "
        "of runs that did not finish, with size and age (nothing is removed).",
    )
    commands.add_parser(
        "cleanup",
        help="remove the segments that `status` lists, and journals older than two weeks",
        description="Remove segments in /dev/shm whose owner process (of this user) is gone, "
        "and journals of unfinished runs older than two weeks.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"] or not argv:
        from .demo import main as demo

        return demo(argv[1:])
    args = build_parser().parse_args(argv)
    return _stale(remove=args.command == "cleanup")


def _stale(remove: bool) -> int:
    from ._text import human_bytes
    from .memory import janitor

    stale = janitor.cleanup_stale() if remove else janitor.find_stale()
    verb = "removed" if remove else "stale"
    for seg in stale:
        print(f"{verb}: {seg.name} {human_bytes(seg.nbytes)} (owner pid {seg.owner_pid} is gone)")
    if not stale:
        print("no stale segments of this user")
    from .engine.journal import journals
    from .memory.janitor import JOURNAL_MAX_AGE_DAYS, remove_old_journals

    if remove:
        for path in remove_old_journals():
            print(f"removed journal {path} (older than {JOURNAL_MAX_AGE_DAYS} days)")
        return 0
    found = journals()
    print(f"journals of unfinished runs: {len(found)}")
    for info in found:
        print(f"  {info.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
