"""The IPython magics: ``%%shm_parallel``, ``%shm_share``, ``%shm_status``,
``%shm_cleanup``, ``%shm_wait``, ``%shm_cancel``. A thin layer: parse a
line, collect names from the user namespace, call the library, write owned
copies back.

A ``--background`` run's handle is bound to its ``-r NAME`` at once; when
the run has ended, ``NAME`` is rebound to its results by the kernel's own
thread, at the start of the next cell (IPython's ``pre_run_cell`` event),
never by the run's thread while user code runs."""

from __future__ import annotations

import ast
import re
import time
from typing import Any

import numpy as np
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .._text import human_bytes
from ..api import BACKENDS, RunHandle, last_errors, parallel_map, status
from ..engine.captured import captured_writes
from ..engine.options import as_sequence
from ..engine.reporting import PROGRESS_MODES
from ..errors import (
    CellSyntaxError,
    DaskBackendError,
    InvalidArgumentError,
    JournalError,
    ParallelInterrupt,
    RunFailed,
)
from ..memory import janitor, segments
from ..memory.arrays import handle_of, label, share
from ..memory.share_cache import cache as share_cache
from ..transports.dask import cluster as dask_cluster
from ..transports.local import pool
from . import cells, journaling

_BACKEND_KWARG = re.compile(r"backend='(\w+)'")

#: How the magic spells parallel_map's arguments, for its error messages.
OPTION_OF = {
    "processes": "-n/--processes",
    "start_method": "--start-method",
    "chunksize": "--chunksize",
    "timeout": "--timeout",
    "client": "--scheduler/--client",
    "backend": "--backend",
    "threads_per_worker": "--threads",
    "fn": "the cell",
    "errors": "--errors",
    "retries": "--retries",
    "item_timeout": "--item-timeout",
    "resume": "--resume",
    "wait": "--background",
}


@magics_class
class ShmMagics(Magics):
    """Magics of shm_kernel_safe; see ``%%shm_parallel?``."""

    def __init__(self, shell: Any = None) -> None:
        super().__init__(shell)
        # run_key -> what the last failed run of that loop kept (its error or
        # last_errors()), for --resume; the engine checks it against the run
        self._resumable: dict[tuple, Any] = {}
        # --background runs not yet settled: (handle, run_key, -r NAME)
        self._background: list[tuple[RunHandle, tuple, str | None]] = []

    @magic_arguments()
    @argument(
        "loop", nargs="*", help="VAR in ITERABLE: the cell runs once per item, VAR bound to it"
    )
    @argument(
        "-n",
        "--processes",
        type=int,
        default=None,
        help="worker processes (default: the usable CPUs)",
    )
    @argument(
        "--start-method",
        default=None,
        choices=["spawn", "forkserver", "fork"],
        help="how workers start (default: forkserver on Linux, spawn elsewhere)",
    )
    @argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="BLAS/OpenMP threads per worker (default: the usable CPUs divided by the "
        "workers, at least 1, so that workers x threads <= CPUs); this kernel's own "
        "BLAS is not changed",
    )
    @argument(
        "--chunksize",
        type=int,
        default=None,
        help="items per message (default: adaptive, timed on the first item)",
    )
    @argument(
        "--backend",
        default="local",
        choices=BACKENDS,
        help="local: this machine's warm process pool (default); dask: a dask.distributed "
        "cluster (a loopback LocalCluster started once, unless --scheduler/--client); "
        "serial: every item in this kernel, one after the other, for debugging "
        "(breakpoints, %%debug)",
    )
    @argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="with --backend dask: the scheduler to connect to, e.g. tcp://10.0.0.5:8786",
    )
    @argument(
        "--client",
        default=None,
        metavar="NAME",
        help="with --backend dask: a distributed.Client variable of the namespace to use",
    )
    @argument("--timeout", type=float, default=None, help="stop the run after this many seconds")
    @argument(
        "--progress",
        default="auto",
        choices=PROGRESS_MODES,
        help="progress display: widget bar in Jupyter, text bar elsewhere",
    )
    @argument(
        "--out",
        action="append",
        default=[],
        metavar="NAME",
        help="an existing ndarray the cell writes into (repeatable); shared writable, "
        "copied back into the same array object after the run",
    )
    @argument(
        "--share",
        action="append",
        default=[],
        metavar="NAME",
        help="share this array with workers even if it is under the 1 MiB threshold",
    )
    @argument(
        "-r",
        "--result",
        default=None,
        metavar="NAME",
        help="gather the value of the cell's last expression for each item into NAME "
        "(an ndarray when the values stack, else a list)",
    )
    @argument(
        "--errors",
        default="raise",
        choices=["raise", "continue"],
        help="raise: the first failed item stops the run (default); continue: failed items "
        "are skipped (masked in --result), a warning sums them up",
    )
    @argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="run an item whose worker died up to N more times on fresh workers",
    )
    @argument(
        "--item-timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop an item running longer than S seconds (its worker is replaced); "
        "it fails with TimeoutError (local backend; dask on our own cluster)",
    )
    @argument(
        "--resume",
        action="store_true",
        help="run only the items the last failed or interrupted run of this loop (the "
        "same variable, items, --out and --result) did not complete, and merge with what "
        "it kept",
    )
    @argument(
        "--journal",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="record completed items on disk, so that running the cell again (also in a new "
        "kernel, after a crash or a restart) runs only the rest; on by default, in the "
        "per-user cache folder; PATH names the file",
    )
    @argument(
        "--no-journal",
        action="store_true",
        help="no journal (also: the environment variable SHM_KERNEL_SAFE_JOURNAL=0)",
    )
    @argument(
        "--journal-reset",
        action="store_true",
        help="discard this cell's journal first: start from scratch",
    )
    @argument(
        "--keep-journal",
        action="store_true",
        help="keep the journal when the run finishes (running the cell again then returns "
        "its results without running anything)",
    )
    @argument(
        "--background",
        action="store_true",
        help="return at once and run in the background: -r NAME holds the run's handle "
        "(NAME.partial, NAME.progress, NAME.cancel()) until the run ends, then its "
        "results, from the start of the next cell on; see %%shm_status, %%shm_wait, "
        "%%shm_cancel",
    )
    @cell_magic
    def shm_parallel(self, line: str, cell: str) -> None:
        """Run the cell once per item, in worker processes, safely.

        Example, the hourly analysis of a year over a big array ``x``::

            %%shm_parallel nn in range(8760) --out y
            y[nn] = hourly_calc(x, nn)

        Names the cell uses are looked up in the namespace when it starts:
        ndarrays over 1 MiB are shared with the workers read-only and without
        copying per task (zero copies for arrays already in shared memory, see
        %shm_share); functions and classes defined in the notebook travel by
        value, so they work under spawn (Windows, macOS). Names assigned
        inside the cell stay in the workers: only ``--out`` arrays (written in
        place, then copied back into your array) and ``--result`` come back.
        The magic returns nothing; afterwards no name refers to shared memory
        it created.

        A task that raises stops the run and shows the item and the traceback
        in the cell; a worker that dies is reported with its item and signal;
        an interrupt stops the workers within a second. Nothing is left in
        /dev/shm in any case.

        ``--backend dask`` runs the same cell on a dask.distributed cluster
        (``pip install 'shm_kernel_safe[dask]'``): a loopback LocalCluster
        started on first use and reused (``-n`` workers), or the scheduler at
        ``--scheduler ADDRESS``, or the Client held by ``--client NAME``. Big
        arrays then reach each worker once per run; --out and --result come
        back the same way.

        When a run fails (an item raises, a worker dies, --timeout, an
        interrupt), what completed is kept: ``--out`` arrays hold the writes
        of completed items, ``--result NAME`` holds their results (masked
        where not done); run the cell again with ``--resume`` to do only the
        rest. ``--errors continue`` goes on past failing items instead.

        ``--backend serial`` runs every item in this kernel, one after the
        other, with the same results and errors: put ``breakpoint()`` in the
        cell, or run ``%debug`` after a failure to land in the failing item's
        frame. ``-n`` and ``--start-method`` are then ignored.

        ``--background`` returns at once and the kernel stays free: ``-r
        NAME`` holds the run's handle (``NAME.partial``: a copy of what
        completed, ``NAME.progress``, ``NAME.cancel()``) and, once the run
        ended, its results from the start of the next cell on; one line
        then says how it ended. ``--out`` arrays get the final values when
        it ends (shared ones, and on ``--backend serial``, as items
        complete). Ctrl-C interrupts the cell in front, never the run:
        ``%shm_cancel NAME`` stops it, keeping what completed.
        """
        try:
            spec = cells.split_line(line)
            args = parse_argstring(self.shm_parallel, spec.options)
        except CellSyntaxError as exc:
            raise UsageError(str(exc)) from None
        if args.loop:
            raise UsageError(f"unexpected {' '.join(args.loop)!r} after the options")
        ns = self.shell.user_ns
        try:
            items = eval(spec.iterable, ns)
        except Exception as exc:
            raise UsageError(
                f"cannot evaluate {spec.iterable!r}: {type(exc).__name__}: {exc}"
            ) from None
        outs = [self._lookup("--out", name) for name in args.out]
        forced = [self._lookup("--share", name) for name in args.share]
        client = self._client(args)
        try:
            cell_fn = cells.compile_cell(spec.target, cell, want_result=args.result is not None)
            if args.result is not None and not cell_fn.returns_last_value:
                raise CellSyntaxError(
                    f"--result {args.result}: the cell must end with an expression to gather"
                )
            fn = cells.resolve(cell_fn, ns)
        except CellSyntaxError as exc:
            raise UsageError(str(exc)) from None
        outs += self._written_outputs(fn, args)

        try:
            items = as_sequence(items)  # a generator is listed once, here
        except InvalidArgumentError as exc:
            raise UsageError(self._restate(exc, spec.iterable, args)) from None
        key = run_key(spec, args)
        prior = self._prior_run(key) if args.resume else None
        journal = journaling.journal_for(args, key, line, fn, ns)
        try:
            result = parallel_map(
                fn,
                items,
                processes=args.processes,
                start_method=args.start_method,
                chunksize=args.chunksize,
                timeout=args.timeout,
                share=forced,
                out=outs,
                progress=args.progress,
                backend=args.backend,
                client=client,
                errors=args.errors,
                retries=args.retries,
                item_timeout=args.item_timeout,
                resume=prior,
                threads_per_worker=args.threads,
                journal=journal,
                keep_journal=args.keep_journal,
                wait=not args.background,
            )
        except JournalError as exc:
            raise UsageError(journaling.refusal(exc)) from None
        except InvalidArgumentError as exc:
            if exc.argument == "client" and args.client and isinstance(exc, TypeError):
                kind = type(client).__name__
                message = f"--client {args.client}: {args.client} is a {kind}, "
                raise UsageError(message + "not a distributed.Client") from None
            raise UsageError(self._restate(exc, spec.iterable, args)) from None
        except DaskBackendError as exc:
            raise UsageError(str(exc)) from None
        except (RunFailed, KeyboardInterrupt) as exc:
            self._kept_on_failure(key, exc, args.result, journaled=journal is not None)
            raise
        if args.background:
            self._started(result, key, args.result)
            return None
        failed = last_errors()
        if failed:
            self._resumable[key] = failed
        else:
            self._resumable.pop(key, None)
        if args.result is not None:
            ns[args.result] = result
        return None

    def _kept_on_failure(
        self, key: tuple, exc: BaseException, result: Any, journaled: bool = False
    ) -> None:
        """After a failed run: keep what completed, and say how to resume."""
        if getattr(exc, "done", None) is None:
            return
        self._resumable[key] = exc
        if result is not None:
            self.shell.user_ns[result] = exc.partial  # type: ignore[attr-defined]
        hint = "run the cell again with --resume to do only the rest"
        if journaled:  # the journal resumes it, in this kernel or a new one
            hint = (
                "run the cell again to do only the rest: its journal keeps them "
                "(--resume does the same in this kernel)"
            )
        if isinstance(exc, RunFailed):
            exc.resume_hint = hint + (f" ({result} holds the partial results)" if result else "")
        elif isinstance(exc, ParallelInterrupt):
            exc.resume_hint = hint

    # -- background runs ---------------------------------------------------------------
    def _started(self, handle: RunHandle, key: tuple, name: str | None) -> None:
        """A --background run started: bind its handle, say where to look."""
        handle.name = name
        self._background.append((handle, key, name))
        if name is None:
            print("running in the background; see %shm_status, %shm_wait, %shm_cancel")
            return
        self.shell.user_ns[name] = handle
        handle.end_note = f"{name} holds the results from the next cell on"
        print(
            f"{name}: running in the background; {name}.partial holds what completed, "
            f"%shm_cancel {name} stops it; {name} is its result from the cell after it ends"
        )

    def settle(self, info: Any = None) -> None:
        """Rebind the ``-r NAME`` of each ended background run to its results,
        with one line on how it ended; ``pre_run_cell`` (the kernel's own
        thread, before the cell's code) and the magics that wait call it."""
        if info is not None and getattr(info, "store_history", True) is False:
            # A frontend's own hidden execute (JupyterLab's Variable Inspector
            # runs one after each cell): its output is never shown, so the
            # line would be lost; the user's next cell settles.
            return
        ended = [entry for entry in self._background if entry[0].done()]
        self._background = [entry for entry in self._background if not entry[0].done()]
        for handle, key, name in ended:
            self._settle_one(handle, key, name)

    def _settle_one(self, handle: RunHandle, key: tuple, name: str | None) -> None:
        ns = self.shell.user_ns
        label = name or "background run"
        if name is not None and ns.get(name) is not handle:
            name = None  # the user rebound it: theirs now
        try:
            result = handle.result()
        except Exception as exc:  # what a blocking cell would have raised
            self._kept_on_failure(key, exc, name)
            kept = ""
            if getattr(exc, "done", None) is not None:
                kept = f"; {name} holds the partial results (masked where not done)" if name else ""
                kept += "; run the cell again with --resume to do only the rest"
            what = str(exc).splitlines()[0] if str(exc) else ""
            why = "" if handle.state == "cancelled" or not what else f" ({what})"
            print(f"{label}: {handle.summary()}{why}{kept}")
            return
        failed = handle.errors
        if failed:
            self._resumable[key] = failed
        else:
            self._resumable.pop(key, None)
        holds = ""
        if name is not None:
            ns[name] = result
            holds = f"; {name} holds the results"
        print(f"{label}: {handle.summary()}{holds}")

    def _runs_named(self, line: str, magic: str) -> list[RunHandle]:
        """The runs ``line`` names (every one of ours when it names none)."""
        names = line.split()
        if not names:
            return [h for h, _, _ in self._background if not h.done()]
        handles = []
        for name in names:
            value = self.shell.user_ns.get(name)
            if not isinstance(value, RunHandle):
                value = next((h for h, _, n in self._background if n == name), None)
            if value is None:
                raise UsageError(f"%{magic} {name}: {name} is not a background run")
            handles.append(value)
        return handles

    @line_magic
    def shm_wait(self, line: str = "") -> None:
        """Wait until background runs end: ``%shm_wait [NAME ...]`` (all by default).

        Then each ``NAME`` holds its run's results. Ctrl-C stops the
        waiting, never the run.
        """
        for handle in self._runs_named(line, "shm_wait"):
            while not handle.wait(0.2):
                pass
        self.settle()

    @line_magic
    def shm_cancel(self, line: str = "") -> None:
        """Stop background runs, keeping what completed: ``%shm_cancel [NAME ...]``
        (all by default). Each ``NAME`` then holds the partial results, and
        ``--resume`` on the cell runs the rest."""
        for handle in self._runs_named(line, "shm_cancel"):
            handle.cancel()
        self.settle()

    def _prior_run(self, key: tuple) -> Any:
        """What the last failed run of this loop kept, for ``--resume``; the
        engine checks that it is a run of these items and ``--out`` arrays."""
        state = self._resumable.get(key)
        if state is None:
            raise UsageError(
                "--resume: no failed, interrupted or partly failed run of this loop (the "
                "same variable, items, --out and --result) in this kernel; run it without "
                "--resume"
            )
        return state

    def _written_outputs(self, fn: Any, args: Any) -> list[np.ndarray]:
        """Namespace arrays the cell writes into (``y[nn] = ...``) without
        ``--out``: the user's outputs, made ``--out`` and said so in one line."""
        ns = self.shell.user_ns
        given = {id(ns[name]) for name in args.out}
        names = [
            w.name
            for w in captured_writes(fn)
            if id(w.array) not in given and ns.get(w.name) is w.array
        ]
        if not names:
            return []
        flags = " ".join(f"--out {n}" for n in names)
        print(f"{', '.join(names)}: written by the cell, so treated as {flags}")
        args.out = [*args.out, *names]  # so that errors about them name them
        return [ns[n] for n in names]

    def _lookup(self, option: str, name: str) -> Any:
        """The value of ``name`` for ``option``; what it must be is the engine's to check."""
        ns = self.shell.user_ns
        if name not in ns:
            raise UsageError(
                f"{option} {name}: no variable named {name!r}; create it first, "
                f"e.g. {name} = np.zeros(N)"
            )
        return ns[name]

    def _client(self, args: Any) -> Any:
        """The ``client=`` of parallel_map from ``--scheduler`` / ``--client``."""
        if args.scheduler and args.client:
            raise UsageError("give --scheduler ADDRESS or --client NAME, not both")
        if args.client:
            return self._lookup("--client", args.client)
        return args.scheduler

    @staticmethod
    def _restate(exc: InvalidArgumentError, iterable: str, args: Any) -> str:
        """The engine's complaint about an argument, in the magic's own terms."""
        if exc.argument == "items":
            return f"{iterable!r} {exc.problem}"
        names = {"out": args.out, "share": args.share}.get(exc.argument)
        if names is not None and exc.index is not None:
            name = names[exc.index]
            return f"--{exc.argument} {name}: {name} {exc.problem}"
        option = OPTION_OF.get(exc.argument)
        if option is None:
            return str(exc)
        problem = _BACKEND_KWARG.sub(r"--backend \1", exc.problem)
        return f"{option} {problem}"

    @line_magic
    def shm_share(self, line: str) -> None:
        """Move arrays into shared memory once: ``%shm_share x [y ...]``.

        The name then holds a shared-memory-backed array that later
        %%shm_parallel cells and parallel_map calls share with zero copies.
        It stays safe to inspect whatever happens to the segment's name.
        """
        names = line.split()
        if not names:
            raise UsageError("usage: %shm_share NAME [NAME ...]")
        ns = self.shell.user_ns
        for name in names:
            if name not in ns:
                raise UsageError(f"%shm_share: no variable named {name!r}")
            value = ns[name]
            if not isinstance(value, np.ndarray) or value.dtype.hasobject:
                raise UsageError(
                    f"%shm_share: {name} is a {type(value).__name__}, not a numeric ndarray"
                )
            if handle_of(value) is not None:
                print(f"{name} already lives in shared memory")
                continue
            t0 = time.perf_counter()
            shared = share(value).view()
            label(shared, f"{name}: {shared.shape} {shared.dtype}")
            ns[name] = shared
            print(
                f"{name}: {human_bytes(shared.nbytes)} moved to shared memory "
                f"in {time.perf_counter() - t0:.2f} s"
            )

    @line_magic
    def shm_status(self, line: str = "") -> None:
        """Background runs (name, progress, time left), shared-memory segments
        of this kernel, stale ones, cached copies of ordinary arrays, warm
        pools (with their BLAS threads per worker) and dask clusters."""
        runs = status()["runs"]
        print(f"Background runs: {len(runs)}")
        for run in runs:
            print(f"  {run['name'] or run['id']}  <run {run['summary']}>")
        live = segments.live_segments()
        print(f"Segments of this kernel: {len(live)}")
        for rec in live:
            state = "views alive" if rec.views_alive else "no views"
            name_state = "name unlinked" if rec.unlinked else "named"
            desc = f" {rec.description}" if rec.description else ""
            print(f"  {rec.name}  {human_bytes(rec.nbytes):>10}{desc}  ({state}, {name_state})")
        stale = janitor.find_stale()
        print(
            f"Stale segments of dead processes: {len(stale)}"
            + ("  (remove with %shm_cleanup)" if stale else "")
        )
        for seg in stale:
            print(f"  {seg.name}  {human_bytes(seg.nbytes):>10}  owner pid {seg.owner_pid}")
        cached = share_cache.summary()
        print(
            f"Cached shared copies of arrays: {len(cached)}, "
            f"{human_bytes(sum(c['nbytes'] for c in cached))} "
            f"(cap {human_bytes(share_cache.limit())}; freed with the array or when it changes)"
        )
        for c in cached:
            use = "in use, " if c["in_use"] else ""
            print(
                f"  {c['name']}  {human_bytes(c['nbytes']):>10} {c['shape']} {c['dtype']}  "
                f"({use}served {c['uses']} call(s))"
            )
        pools = pool.pool_info()
        print(f"Warm pools: {len(pools)}")
        for info in pools:
            threads = info["threads"]
            print(
                f"  {info['processes']} x {info['start_method']}, "
                f"{threads} BLAS thread{'' if threads == 1 else 's'} each: pids {info['pids']}"
                + ("  (a run's own, stopped when it ends)" if info.get("private") else "")
            )
        clusters = dask_cluster.status_lines()  # imports no dask unless it was used
        print(f"Dask clusters: {len(clusters)}")
        for line in clusters:
            print(line)
        for line in journaling.status_lines():
            print(line)

    @line_magic
    def shm_cleanup(self, line: str = "") -> None:
        """Remove segments left in /dev/shm by dead processes of this user,
        and journals of unfinished runs older than two weeks."""
        removed = janitor.cleanup_stale()
        if not removed:
            print("nothing to clean: no stale segments of this user")
        for seg in removed:
            print(f"removed {seg.name} ({human_bytes(seg.nbytes)}, owner pid {seg.owner_pid})")
        for path in janitor.remove_old_journals():
            print(f"removed journal {path} (older than {janitor.JOURNAL_MAX_AGE_DAYS} days)")


def run_key(spec: cells.LoopSpec, args: Any) -> tuple:
    """What makes two ``%%shm_parallel`` lines the same run, for ``--resume``.

    The parsed loop (variable and items expression, spacing ignored), the
    ``--out`` arrays and the ``--result`` name: what a run computes and
    where it goes. The other options change how it runs (workers, backend,
    chunks, timeouts, progress, error handling), not what it returns, so
    they may differ, and any option may stand anywhere on the line. The
    cell's code is not part of it: a cell fixed after a failure resumes,
    with a warning from the engine that its code changed.
    """
    return (
        ast.dump(ast.parse(spec.target, mode="eval")),
        ast.dump(ast.parse(spec.iterable, mode="eval")),
        tuple(args.out),
        args.result,
    )
