"""Command line: ``python -m shm_kernel_safe {demo,status,cleanup}``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "demo"
    if command == "demo":
        from .demo import main as demo

        return demo(argv[1:])
    if command in ("status", "cleanup"):
        from .errors import human_bytes
        from .memory import janitor

        stale = janitor.cleanup_stale() if command == "cleanup" else janitor.find_stale()
        verb = "removed" if command == "cleanup" else "stale"
        for seg in stale:
            print(
                f"{verb}: {seg.name} {human_bytes(seg.nbytes)} (owner pid {seg.owner_pid} is gone)"
            )
        if not stale:
            print("no stale segments of this user")
        return 0
    print(
        f"usage: python -m shm_kernel_safe [demo|status|cleanup], not {command!r}", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
