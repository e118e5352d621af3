"""Which dask cluster a call runs on: a client the user gave, a scheduler
address, or a ``LocalCluster`` of our own, started once and reused.

``distributed`` is an optional dependency (the ``dask`` extra): it is
imported only here and only when the dask backend is asked for, so a kernel
without it pays nothing and gets a one-line error naming the extra.

Our own cluster runs worker *processes* (one thread each: the user's code is
Python that holds the GIL), speaks TLS with credentials only it and this
process hold (:mod:`.security`), and listens on loopback only, scheduler HTTP
server included (a dashboard there when bokeh is installed). It is closed
at interpreter exit and, in a kernel, before ipykernel kills its children
(see :mod:`shm_kernel_safe.lifecycle`), so a notebook that used it shuts down as quickly as
one that did not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import threading
import time
from typing import Any

from ... import lifecycle
from ..._platform import interrupt_deferred, usable_cpus
from ..._text import human_bytes
from ...engine.threads import THREAD_ENV_VARS, threads_for
from ...errors import DaskBackendError, InvalidArgumentTypeError
from ..main_free import make_context
from .kept import kept_arrays

#: Seconds to wait for a scheduler that does not answer.
CONNECT_TIMEOUT = 10.0
#: Seconds to wait for the workers of our own cluster to (re)start.
WORKER_START_TIMEOUT = 60.0

_lock = threading.RLock()
_local: dict[str, Any] = {}  # "cluster", "client" of our own LocalCluster
_connected: dict[str, Any] = {}  # scheduler address -> Client we opened
_checked: set[str] = set()  # client ids whose workers can import us


_MISSING = "the dask backend needs the 'distributed' package: pip install 'shm_kernel_safe[dask]'"


def check_distributed() -> None:
    """A one-line error now if ``distributed`` is not installed; imports nothing
    (the import takes a second, and belongs where an interrupt is handled)."""
    if sys.modules.get("distributed") is not None:
        return
    try:
        found = importlib.util.find_spec("distributed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise DaskBackendError(_MISSING)


def import_distributed() -> Any:
    """``distributed`` (and our worker module, which builds on it), or a
    one-line error saying how to get it.

    Imported with interrupts held: a KeyboardInterrupt inside the import of
    a package leaves it half-imported for the rest of the process (later
    calls failed with "module 'distributed' has no attribute 'utils'").
    """
    with interrupt_deferred():
        try:
            import distributed

            from . import worker  # noqa: F401
        except ImportError as exc:
            raise DaskBackendError(_MISSING) from exc
    return distributed


def get_client(
    client: Any = None, processes: int | None = None, threads_per_worker: int | None = None
) -> Any:
    """The ``distributed.Client`` a call runs on.

    ``client`` is a Client (used as is), a scheduler address such as
    ``"tcp://10.0.0.5:8786"`` (connected once, reused), or None for our own
    loopback ``LocalCluster`` with ``processes`` workers (default: the usable
    CPUs), started on first use and reused across calls, each worker bounded
    to ``threads_per_worker`` BLAS/OpenMP threads (default: the CPUs shared
    out, see ``engine.threads``).
    """
    distributed = import_distributed()
    if client is None:
        result = _local_client(distributed, processes, threads_per_worker)
    elif isinstance(client, distributed.Client):
        if client.status not in ("running", "connecting", "newly-created"):
            raise DaskBackendError(f"the dask client {client!r} is {client.status}, not running")
        result = client
    elif isinstance(client, str):
        result = _client_for_address(distributed, client)
    else:
        raise InvalidArgumentTypeError(
            "client",
            f"must be a distributed.Client, a scheduler address or None, "
            f"got {type(client).__name__}",
        )
    _check_workers(result)
    return result


def _client_for_address(distributed: Any, address: str) -> Any:
    with _lock:
        existing = _connected.get(address)
        if existing is not None and existing.status == "running":
            return existing
        try:
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DaskBackendError(
                f"cannot reach the dask scheduler at {address!r} within "
                f"{CONNECT_TIMEOUT:.0f} s ({reason}); is it running (`dask scheduler`) "
                f"and reachable from this machine?"
            ) from None
        _connected[address] = client
        return client


def _local_client(
    distributed: Any, processes: int | None, threads_per_worker: int | None = None
) -> Any:
    import dask

    wanted = processes or usable_cpus()
    with _lock:
        client = _local.get("client")
        if client is not None and client.status == "running":
            cluster = _local["cluster"]
            if processes is not None and len(cluster.worker_spec) != wanted:
                cluster.scale(wanted)  # -n changed between cells
            # Workers killed by the last call are restarting: wait for them,
            # or this call's data would reach only the survivors.
            wanted = len(cluster.worker_spec)
            try:
                wait_for_local_workers(client, wanted, WORKER_START_TIMEOUT)
            except Exception as exc:
                raise DaskBackendError(
                    f"the local dask cluster did not get back to {wanted} workers within "
                    f"{WORKER_START_TIMEOUT:.0f} s ({type(exc).__name__}); see %shm_status, "
                    f"or %unload_ext and %load_ext shm_kernel_safe to start afresh"
                ) from None
            _limit_threads(client, threads_for(wanted, threads_per_worker))
            return client
        close_local()
        # Interrupts held while the cluster starts (seconds): an interrupt
        # inside would leave its scheduler and worker processes running,
        # owned by nobody; it is delivered once the cluster is ours.
        with interrupt_deferred():
            _start_and_connect(distributed, dask, wanted, threads_per_worker)
            lifecycle.hook_kernel_shutdown()
        return _local["client"]


def _start_and_connect(
    distributed: Any, dask: Any, wanted: int, threads_per_worker: int | None
) -> None:
    """Start our LocalCluster and its Client, into ``_local``."""
    _main_free_worker_starts(True)
    path_before = list(sys.path)
    try:
        threads = threads_for(wanted, threads_per_worker)
        cluster = _start_local_cluster(distributed, dask, wanted, threads)
    except DaskBackendError:
        _main_free_worker_starts(False)
        raise
    except Exception as exc:
        _main_free_worker_starts(False)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DaskBackendError(
            f"could not start a local dask cluster of {wanted} workers: {reason}"
        ) from None
    finally:
        # The in-process scheduler puts its scratch directory at the front
        # of sys.path (for upload_file, which our cluster never serves):
        # keep the kernel's import path as the user had it.
        sys.path[:] = [p for p in sys.path if p in path_before or "dask-scratch" not in p]
    client = distributed.Client(cluster, set_as_default=False)
    from .worker import InterruptsToTheKernel, MallocTuning

    client.register_plugin(MallocTuning())
    client.register_plugin(InterruptsToTheKernel())
    _local.update(cluster=cluster, client=client)
    _limit_threads(client, threads)


def _limit_threads(client: Any, threads: int) -> None:
    """Bound BLAS/OpenMP threads in every worker of our cluster, restarted
    ones too (a worker plugin); re-registered only when the bound changes."""
    from .worker import ThreadLimits

    if _local.get("threads") != threads:
        client.register_plugin(ThreadLimits(threads))
        _local["threads"] = threads


def local_threads() -> int | None:
    """BLAS/OpenMP threads per worker of our cluster, None when it is not running."""
    with _lock:
        return _local.get("threads") if _local.get("client") is not None else None


def _start_local_cluster(distributed: Any, dask: Any, n_workers: int, threads: int = 1) -> Any:
    """Our LocalCluster: worker processes on loopback, tuned for our chunks.

    Workers start with the BLAS/OpenMP thread variables at ``threads``
    (the nanny's ``env``, set in the worker process before it starts its
    worker; the ``ThreadLimits`` plugin then bounds libraries already
    loaded). Not through dask's ``pre-spawn-environ``: an in-process nanny
    writes those into *this* process's environment, so every library the
    kernel loaded later would have run on one thread.

    Without the Active Memory Manager: it would drop the replicas a broadcast
    made (no task waits on them between chunks), workers would fetch big
    arrays again, and a single death could lose scattered data.

    With no allowed failures: a chunk whose worker dies is not run again by
    dask on the next worker (an item that kills its worker would kill each
    in turn, and every copy of the scattered data with them); the engine
    hears of the death at once and applies ``errors=``/``retries=``, as on
    the local backend.

    Over TLS with temporary credentials (see :mod:`.security`): no
    other process on this machine can connect to it.
    """
    from .security import local_cluster_security

    security = local_cluster_security()
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    for var in THREAD_ENV_VARS:
        environ.pop(var, None)
    with dask.config.set(
        {
            "distributed.scheduler.active-memory-manager.start": False,
            "distributed.scheduler.allowed-failures": 0,
            "distributed.nanny.pre-spawn-environ": environ,
        }
    ):
        return distributed.LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            security=security,  # tls:// when it requires encryption
            # the scheduler's HTTP server (dashboard when bokeh is there,
            # health and metrics otherwise) also on loopback, any free port
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.CRITICAL,  # our errors say what happened
            env=dict.fromkeys(THREAD_ENV_VARS, str(threads)),
            # Dask's statistical profiler samples each worker's task
            # thread 100 times a second, taking the GIL: items ran 20-40%
            # slower with it (benchmarks/bench_dask.py). Our cluster only
            # runs our chunks; its dashboard then has no profile page.
            config=dask.config.merge(
                dask.config.config,
                {"distributed": {"worker": {"profile": {"enabled": False}}}},
            ),
        )


def _main_free_worker_starts(on: bool) -> None:
    """While our cluster lives, nannies start workers (first start and every
    restart after a crash) without importing the user's ``__main__``, as our
    own pools do: a script without a main guard would otherwise run again
    in every worker and try to start a cluster of its own. Functions from
    ``__main__`` reach workers by value (cloudpickle), so nothing is lost.
    """
    from distributed import process, utils

    if not on:
        process.get_mp_context = utils.get_mp_context
        return

    def get_mp_context() -> Any:
        ctx = utils.get_mp_context()
        return make_context("spawn") if ctx.get_start_method() == "spawn" else ctx

    process.get_mp_context = get_mp_context


def _check_workers(client: Any) -> None:
    """Fail in one line if the workers cannot run our chunk function."""
    if client.id in _checked:
        return
    try:
        client.run(_worker_can_import, wait=True)
    except Exception as exc:
        raise DaskBackendError(
            f"the dask workers cannot import shm_kernel_safe ({type(exc).__name__}: {exc}); "
            f"install it on every worker: pip install 'shm_kernel_safe[dask]'"
        ) from None
    _checked.add(client.id)


def _worker_can_import() -> str:
    import shm_kernel_safe.transports.dask.worker  # noqa: F401

    return "ok"


def restore_local_workers(client: Any) -> None:
    """Start again the workers of our cluster whose nanny dask closed.

    A LocalCluster closes the nanny of a worker that has not come back
    within ``distributed.deploy.lost-worker-timeout`` (15 s): on a loaded
    machine a worker killed under an item can take that long to restart,
    and the cluster then stays a worker short for good. ``scale`` to the
    same size starts what its spec lists and no nanny runs.
    """
    if not is_local(client):
        return
    cluster = _local["cluster"]
    with contextlib.suppress(Exception):
        if set(cluster.worker_spec) - set(cluster.workers):
            cluster.scale(len(cluster.worker_spec))


def wait_for_local_workers(client: Any, wanted: int, timeout: float) -> None:
    """Wait until our cluster has ``wanted`` workers, starting again those
    whose nanny dask closes meanwhile (see :func:`restore_local_workers`);
    raises ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while len(client.scheduler_info(n_workers=-1)["workers"]) < wanted:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"fewer than {wanted} workers after {timeout:.0f} s")
        restore_local_workers(client)
        with contextlib.suppress(Exception):
            client.wait_for_workers(wanted, timeout=min(5.0, left))


def is_local(client: Any) -> bool:
    """Whether ``client`` drives the cluster we started (ours to restart)."""
    return client is _local.get("client")


def stop_stuck(client: Any, call_id: str, grace: float) -> list[str]:
    """Kill workers still running a chunk of ``call_id`` after ``grace`` s.

    Their nannies start fresh ones at once, as after a crash; killing is
    what the local backend does to a stuck worker too (a thread cannot be
    stopped inside an item).
    """
    from .worker import busy_with, exit_worker

    deadline = time.monotonic() + grace
    try:
        while True:
            busy = client.run(busy_with, call_id)
            stuck = [addr for addr, running in busy.items() if running]
            if not stuck or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if stuck:
            client.run(exit_worker, workers=stuck, wait=False)
        return stuck
    except Exception:  # the cluster closed meanwhile: nothing left to stop
        return []


def status_lines() -> list[str]:
    """Lines for ``%shm_status``: clusters and schedulers in use."""
    lines = []
    with _lock:
        client = _local.get("client")
        entries = [("local cluster", client)] if client is not None else []
        entries += [(f"scheduler {addr}", c) for addr, c in _connected.items()]
        for label, c in entries:
            if c.status != "running":
                lines.append(f"  {label}: {c.status}")
                continue
            try:
                workers = c.nthreads()
                pids = sorted(c.run(os.getpid).values()) if label == "local cluster" else []
            except Exception as exc:  # a scheduler that went away
                lines.append(f"  {label}: unreachable ({type(exc).__name__})")
                continue
            has_bokeh = importlib.util.find_spec("bokeh") is not None
            dash = c.dashboard_link if has_bokeh else None
            n_kept, kept_bytes = kept_arrays.summary(c)
            threads = _local.get("threads") if label == "local cluster" else None
            lines.append(
                f"  {label} at {c.scheduler.address}: {len(workers)} workers"
                + (f", {_plural(threads, 'BLAS thread')} each" if threads else "")
                + (f", pids {pids}" if pids else "")
                + (f", dashboard {dash}" if dash else "")
                + (
                    f"; keeps {n_kept} input array(s) for later runs, "
                    f"{human_bytes(kept_bytes)} per worker"
                    if n_kept
                    else ""
                )
            )
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _forget_kept(client: Any) -> None:
    if client is not None:
        kept_arrays.forget(client)


def close_local() -> None:
    """Close our LocalCluster (workers, nannies, scheduler) if it runs."""
    with _lock:
        client = _local.pop("client", None)
        cluster = _local.pop("cluster", None)
        _local.pop("threads", None)
    _forget_kept(client)
    for obj in (client, cluster):
        if obj is not None:
            with contextlib.suppress(Exception):
                obj.close(timeout=10)
    if cluster is not None:
        _main_free_worker_starts(False)


def close_all() -> None:
    """Close our cluster and disconnect from schedulers we connected to;
    release what runs left on clusters given to us as Clients."""
    close_local()
    kept_arrays.forget()
    with _lock:
        clients = list(_connected.values())
        _connected.clear()
        _checked.clear()
    for client in clients:
        _forget_kept(client)
        with contextlib.suppress(Exception):
            client.close(timeout=5)


def _close(event: str) -> None:
    close_all()


lifecycle.register("dask-clusters", _close, order=30)
