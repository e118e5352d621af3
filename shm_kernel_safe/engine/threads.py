"""BLAS and OpenMP threads per worker: bounded so that workers x threads <= CPUs.

OpenBLAS, MKL, BLIS and OpenMP runtimes each start as many threads as the
machine has CPUs, in every process. With one worker per CPU, a BLAS-heavy
item then runs CPUs x CPUs threads that fight over the cores (64 x 64 on a
64-core workstation); measured here, items of one 400x400 matmul each ran
at 0.70-0.99 of their speed with one BLAS thread per worker. joblib's loky
workers and dask's nannies bound these threads; so do our workers.

Every worker of a pool or cluster we start calls :func:`limit_threads`
once, before its first item:

* ``threadpoolctl`` sets the thread count of every BLAS / OpenMP library
  already loaded in the worker (numpy's, inherited from a forkserver or
  imported under spawn);
* the environment variables that such libraries read once when they load
  (``OMP_NUM_THREADS`` and friends) are set in the worker, for libraries a
  task imports later (scipy's own OpenBLAS, numexpr, torch...).

The calling process is never touched: its BLAS keeps the threads it has,
and the serial transport, which runs items in it, bounds nothing.
"""

from __future__ import annotations

import os

from .._platform import usable_cpus

#: Variables that BLAS and OpenMP runtimes read once, when they load.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def threads_for(workers: int, threads_per_worker: int | None = None) -> int:
    """BLAS/OpenMP threads each of ``workers`` processes may use.

    Parameters
    ----------
    workers : int
        Worker processes that run at the same time on this machine.
    threads_per_worker : int, optional
        The caller's choice, used as is; by default the usable CPUs shared
        out, at least one: ``workers x threads <= CPUs``.

    Returns
    -------
    int
    """
    if threads_per_worker is not None:
        return int(threads_per_worker)
    return max(1, usable_cpus() // max(1, workers))


def limit_threads(threads: int) -> None:
    """In a worker: bound BLAS/OpenMP threads to ``threads`` (see the module doc)."""
    value = str(int(threads))
    for var in THREAD_ENV_VARS:
        os.environ[var] = value
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(threads))


def thread_info() -> list[tuple[str, int]]:
    """(library, threads) of every BLAS/OpenMP library loaded in this process."""
    from threadpoolctl import threadpool_info

    return [(lib["internal_api"], int(lib["num_threads"])) for lib in threadpool_info()]
