"""Soak before a release: the jobs users run, many times, each checked for
leaks of any kind.

    python benchmarks/soak.py --rounds 20                   # all three phases
    python benchmarks/soak.py --demo 20 --spyder 50 --fuzz-steps 10000
    python benchmarks/soak.py --rounds 0 --fuzz-steps 0 --kills 200   # the kill phase

Phases (each round in fresh processes):

* ``demo``: ``python -m shm_kernel_safe demo`` (the main job of the README);
* ``spyder``: the seed scenario in a real spyder-kernels kernel with the
  extension: the original question's code (a view over a segment closed and
  unlinked), then ``%%shm_parallel`` over 8760 hours with ``--out``,
  results compared with a serial loop, the Variable Explorer's namespace
  view (which computes min/max of every array), then a graceful shutdown
  as a frontend does it (jupyter_client interrupts, then asks);
* ``fuzz``: the stateful test (``tests/engine/test_stateful.py``) for
  ``--fuzz-steps`` steps in one pytest run;
* ``kill``: ``--kills`` SIGKILLs of random local workers at random moments
  across many runs (``errors="raise"``, ``"continue"``, ``retries=3`` at
  random), in one process; after every run the run's ledger (``exc.done``,
  the result's mask) is compared with what the items wrote into an ``out=``
  array, and a side-channel file proves which item ran twice. A miscounted
  item is one the ledger calls done that did not write, or calls failed
  that completed (an item stopped by the kill between its last write and
  being counted is listed apart, as "caught mid-write").

After every round: the ``/dev/shm`` entries made by the processes of that
round (the process under test and every descendant seen while it ran:
segments named with their owner's pid, loky's ``sem.loky-<pid>-*``,
joblib's ``joblib_memmapping_folder_<pid>_*``) that are
still there, and those processes still alive. Entries of other processes
(another user's job on the same machine) are not counted; new entries that
carry no owner pid are listed apart, as "unattributed".

Prints counts (runs, failures, leaked entries, leftover processes) per
phase; exits 1 if any round failed or leaked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from shm_kernel_safe.memory.naming import parse_name  # noqa: E402

SHM = "/dev/shm"
_BY_PID = re.compile(r"^(?:sem\.loky-|joblib_memmapping_folder_)(\d+)[-_]")


# -- what a round leaves behind ------------------------------------------------
def shm_now() -> set[str]:
    return set(os.listdir(SHM)) if os.path.isdir(SHM) else set()


def owner_of(entry: str) -> int | None:
    """The pid that made a /dev/shm entry, when its name says so."""
    parsed = parse_name(entry)
    if parsed is not None:
        return parsed.pid
    match = _BY_PID.match(entry)
    return int(match.group(1)) if match else None


class Tree:
    """Every process that descends from ``root`` while it runs (polled)."""

    def __init__(self, root: int) -> None:
        self.procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._add(root)
        self._thread = threading.Thread(target=self._poll, args=(root,), daemon=True)
        self._thread.start()

    def _add(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            if pid not in self.procs:
                self.procs[pid] = psutil.Process(pid)

    def _poll(self, root: int) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(root).children(recursive=True):
                    self._add(child.pid)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self, timeout: float = 5.0) -> list[int]:
        """Processes of the tree still running (zombies excluded) after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for pid, proc in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        left.append(pid)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.1)


@dataclass
class Round:
    ok: bool
    detail: str = ""
    leaked: list[str] = field(default_factory=list)
    unattributed: list[str] = field(default_factory=list)
    leftover: list[int] = field(default_factory=list)
    seconds: float = 0.0


def judge(before: set[str], tree: Tree, ok: bool, detail: str, t0: float) -> Round:
    leftover = tree.alive()
    pids = set(tree.procs)
    deadline = time.monotonic() + 3  # names are freed by the last process to exit
    while True:
        new = shm_now() - before
        leaked = sorted(e for e in new if owner_of(e) in pids)
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    unattributed = sorted(e for e in new if owner_of(e) is None)
    return Round(ok, detail, leaked, unattributed, leftover, time.monotonic() - t0)


# -- the phases ------------------------------------------------------------------
def run_command(cmd: list[str], timeout: float, env: dict | None = None) -> Round:
    before = shm_now()
    t0 = time.monotonic()
    # output to a file, not a pipe: an orphaned worker holding the pipe open
    # must not make us wait for it (it is counted as leftover instead)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        tree = Tree(proc.pid)
        try:
            proc.wait(timeout=timeout)
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            for p in tree.procs.values():
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait()
            ok = False
        tree.stop()
        log.seek(0)
        out = log.read()
    detail = "" if ok else f"exit {proc.returncode}: {out[-1500:]}"
    return judge(before, tree, ok, detail, t0)


def demo_round(args: argparse.Namespace) -> Round:
    cmd = [sys.executable, "-m", "shm_kernel_safe", "demo", "--rows", str(args.demo_rows)]
    return run_command(cmd, timeout=600)


def fuzz_round(args: argparse.Namespace) -> Round:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["-o", "addopts=", "--timeout", "3600", "tests/engine/test_stateful.py"]
    return run_command(cmd, timeout=3600, env={"SHM_KERNEL_SAFE_FUZZ_STEPS": str(args.fuzz_steps)})


SEED_DEFS = """
import numpy as np
from multiprocessing import shared_memory
HOURS = 8760
x = np.random.default_rng(0).standard_normal((200_000, 16))   # 24 MiB
shm = shared_memory.SharedMemory(create=True, size=x.nbytes)
x_shared = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf)   # the original question
x_shared[:] = x
x_hour = x_shared[5]
shm.close()
shm.unlink()
def hourly_calc(x, nn):
    start = (nn * (x.shape[0] - 200)) // (HOURS - 1)
    return float(np.sqrt(np.abs(x[start:start + 200])).sum())
y = np.zeros(HOURS)
"""
SEED_CELL = """%%shm_parallel nn in range(HOURS) --out y
y[nn] = hourly_calc(x_shared, nn)
"""
SEED_CHECK = "bool(np.allclose(y, [hourly_calc(x, nn) for nn in range(HOURS)]))"


def spyder_round(args: argparse.Namespace) -> Round:
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    from tests.kernels import SpyderFrontend, evaluate, execute

    before = shm_now()
    t0 = time.monotonic()
    km = KernelManager()
    km._kernel_spec = KernelSpec(
        argv=[sys.executable, "-m", "spyder_kernels.console", "-f", "{connection_file}"],
        display_name="spyder",
        language="python",
        interrupt_mode="signal",
    )
    km.start_kernel(cwd=ROOT)
    kernel = km.provisioner.process
    tree = Tree(kernel.pid)
    client = km.client()
    client.start_channels()
    ok, detail = True, ""
    try:
        client.wait_for_ready(timeout=60)
        spyder = SpyderFrontend(client)
        spyder.configure_view(minmax=True)
        for code in ("%load_ext shm_kernel_safe", SEED_DEFS, SEED_CELL):
            res = execute(client, code, timeout=300)
            if res["status"] != "ok":
                raise RuntimeError(f"{code.strip().splitlines()[0]!r}: {res['error']}")
        view = spyder.call("get_namespace_view")  # min/max of every array, x_shared too
        if "Min" not in view["x_shared"]["view"]:
            raise RuntimeError(f"unexpected view of x_shared: {view['x_shared']}")
        if evaluate(client, SEED_CHECK, timeout=120) != "True":
            raise RuntimeError("parallel results differ from the serial loop")
    except (Exception, queue.Empty) as exc:
        ok, detail = False, f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        client.stop_channels()
        with contextlib.suppress(Exception):
            km.shutdown_kernel(now=False)  # as a frontend: interrupt, then ask
    tree.stop()
    if ok and kernel.poll() != 0:  # jupyter_client kills a kernel that does not stop
        ok, detail = False, f"the kernel did not shut down by itself (exit {kernel.poll()})"
    return judge(before, tree, ok, detail, t0)


KILL_SCRIPT = r"""
import json, os, random, signal, sys, tempfile, threading, time, warnings
from collections import Counter
import numpy as np
import shm_kernel_safe as sks
from shm_kernel_safe.transports.local import pool

kills_wanted = int(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
warnings.simplefilter("ignore")
N = 1500
log = tempfile.mktemp(prefix="sks-soak-ran-")
active = threading.Event()
stop = threading.Event()
kills = {"n": 0, "run": 0}

def killer():
    while not stop.is_set():
        time.sleep(rng.uniform(0.05, 0.4))
        if not active.is_set():
            continue
        pids = [p for info in pool.pool_info() for p in info["pids"]]
        if pids and kills["n"] < kills_wanted:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills["n"] += 1
            kills["run"] += 1

def item(i, rows, log):
    time.sleep(0.0005)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"%d\n" % i)
    os.close(fd)
    rows[i] = i + 1  # the item's last act
    return i

totals = Counter()
threading.Thread(target=killer, daemon=True).start()
while kills["n"] < kills_wanted:
    mode = rng.choice(["raise", "continue", "retries"])
    opts = {"raise": {}, "continue": {"errors": "continue"}, "retries": {"retries": 3}}[mode]
    rows = sks.zeros(N)
    with open(log, "w"):
        pass
    kills["run"] = 0
    active.set()
    try:
        out = sks.parallel_map(lambda i: item(i, rows, log), range(N), processes=2,
                               out=[rows], **opts)
        done = ~np.ma.getmaskarray(out)
    except sks.WorkerDiedError as exc:
        done = exc.done
        out = None
    finally:
        active.clear()
    wrote = rows != 0
    with open(log) as f:
        ran = Counter(int(x) for x in f.read().split())
    totals["runs"] += 1
    totals["items"] += N
    totals["miscounted"] += int((done & ~wrote).sum())
    mid = int((wrote & ~done).sum())
    totals["caught_mid_write"] += mid
    totals["ran_twice"] += sum(1 for c in ran.values() if c > 1)
    if out is not None and mode == "continue":
        failed = [e.index for e in sks.last_errors()]
        masked = np.flatnonzero(np.ma.getmaskarray(out)).tolist()
        totals["miscounted"] += len(set(failed) ^ set(masked))
    if out is not None and mode == "retries":
        totals["miscounted"] += int((~done).sum())
stop.set()
os.unlink(log)
sks.shutdown_pools()
totals["kills"] = kills["n"]
print(json.dumps(dict(totals)))
"""


def kill_round(args: argparse.Namespace) -> Round:
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(args.kills), str(args.seed)]
    before = shm_now()
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        tree = Tree(proc.pid)
        try:
            proc.wait(timeout=3600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        tree.stop()
        log.seek(0)
        out = log.read()
    try:
        counts = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return judge(before, tree, False, f"exit {proc.returncode}: {out[-1500:]}", t0)
    ok = proc.returncode == 0 and counts.get("miscounted", 1) == 0
    detail = ", ".join(f"{k} {v}" for k, v in counts.items())
    return judge(before, tree, ok, detail, t0)


PHASES = {"demo": demo_round, "spyder": spyder_round, "fuzz": fuzz_round, "kill": kill_round}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of demo and spyder")
    parser.add_argument("--demo", type=int, help="rounds of the demo (default: --rounds)")
    parser.add_argument("--spyder", type=int, help="rounds in Spyder's kernel (default: --rounds)")
    parser.add_argument("--fuzz-steps", type=int, default=10_000, help="0 skips the fuzz")
    parser.add_argument("--demo-rows", type=int, default=2_000_000, help="rows of x in the demo")
    parser.add_argument("--kills", type=int, default=200, help="worker kills; 0 skips them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill phase")
    parser.add_argument("--json", help="also write every round's result to this file")
    args = parser.parse_args()
    plan = {
        "demo": args.rounds if args.demo is None else args.demo,
        "spyder": args.rounds if args.spyder is None else args.spyder,
        "fuzz": 1 if args.fuzz_steps > 0 else 0,
        "kill": 1 if args.kills > 0 else 0,
    }
    results: dict[str, list[Round]] = {}
    for phase, n in plan.items():
        results[phase] = []
        for i in range(n):
            r = PHASES[phase](args)
            results[phase].append(r)
            bad = (not r.ok) or r.leaked or r.leftover
            mark = "FAIL" if bad else "ok"
            print(
                f"{phase} {i + 1}/{n}: {mark} in {r.seconds:.1f} s"
                + (f"; {r.detail}" if r.detail and (bad or phase == "kill") else "")
                + (f"; leaked {r.leaked}" if r.leaked else "")
                + (f"; leftover pids {r.leftover}" if r.leftover else "")
                + (f"; unattributed new entries {r.unattributed}" if r.unattributed else ""),
                flush=True,
            )

    print(f"\n{'phase':8s} {'runs':>5s} {'failures':>9s} {'leaked':>7s} {'leftover':>9s}")
    failed = False
    summary = {}
    for phase, rounds in results.items():
        if not rounds:
            continue
        fails = sum(not r.ok for r in rounds)
        leaked = sum(len(r.leaked) for r in rounds)
        leftover = sum(len(r.leftover) for r in rounds)
        unattributed = sum(len(r.unattributed) for r in rounds)
        failed |= bool(fails or leaked or leftover)
        print(f"{phase:8s} {len(rounds):5d} {fails:9d} {leaked:7d} {leftover:9d}")
        summary[phase] = {
            "runs": len(rounds),
            "failures": fails,
            "leaked_entries": leaked,
            "leftover_processes": leftover,
            "unattributed_new_entries": unattributed,
        }
        if unattributed:
            print(
                f"         ({unattributed} new /dev/shm entries without an owner pid, not counted)"
            )
    if args.fuzz_steps:
        print(f"(fuzz: one run of {args.fuzz_steps} steps)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "summary": summary,
                    "rounds": {p: [r.__dict__ for r in rs] for p, rs in results.items()},
                },
                fh,
                indent=1,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
