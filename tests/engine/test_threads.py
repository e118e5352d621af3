"""BLAS/OpenMP threads bounded in every worker we start: asked
of threadpoolctl inside real workers, under each start method and on our
own dask cluster; the caller's own BLAS untouched."""

from __future__ import annotations

import os
import time

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import shm_kernel_safe as sks
from shm_kernel_safe._platform import usable_cpus
from shm_kernel_safe.engine.threads import THREAD_ENV_VARS, thread_info, threads_for

from ..helpers import worker_children

pytestmark = [pytest.mark.timeout(180)]


def report(_: int) -> tuple:
    """In a worker: its BLAS/OpenMP libraries' thread counts and the env vars."""
    return (
        tuple(sorted(thread_info())),
        tuple(os.environ.get(v) for v in THREAD_ENV_VARS),
        os.getpid(),
    )


def check(reports: list, threads: int) -> None:
    assert reports
    for libs, env, _pid in reports:
        assert libs, "no BLAS/OpenMP library loaded in the worker"
        assert all(n == threads for _, n in libs), libs
        assert env == (str(threads),) * len(THREAD_ENV_VARS)


def parent_state() -> tuple:
    return tuple(sorted(thread_info())), tuple(os.environ.get(v) for v in THREAD_ENV_VARS)


def test_default_shares_out_the_cpus():
    assert threads_for(1) == usable_cpus()
    assert threads_for(usable_cpus()) == 1
    assert threads_for(10 * usable_cpus()) == 1
    assert threads_for(2, 3) == 3


@pytest.mark.parametrize("start_method", ["forkserver", "spawn", "fork"])
def test_local_workers_report_bounded_threads(start_method, no_orphans):
    before = parent_state()
    expected = threads_for(2)
    reports = sks.parallel_map(report, range(40), processes=2, start_method=start_method)
    check(reports, expected)
    # --threads / threads_per_worker override: another pool, another bound
    reports = sks.parallel_map(
        report, range(40), processes=2, start_method=start_method, threads_per_worker=2
    )
    check(reports, 2)
    assert parent_state() == before  # the caller's BLAS and environment untouched


def test_one_worker_gets_every_cpu(no_orphans):
    reports = sks.parallel_map(report, range(4), processes=1)
    check(reports, usable_cpus())


def test_serial_leaves_the_callers_blas_alone():
    before = parent_state()
    reports = sks.parallel_map(report, range(3), backend="serial", threads_per_worker=1)
    assert {r[0] for r in reports} == {before[0]}
    assert parent_state() == before


def test_bad_threads_is_a_one_line_error():
    with pytest.raises(sks.InvalidArgumentError, match="threads_per_worker must be an integer"):
        sks.parallel_map(report, range(3), threads_per_worker=0)


def test_magic_threads_option_and_status(no_orphans, capsys):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "shm_kernel_safe")
    try:
        shell.user_ns["report"] = report
        shell.run_cell_magic("shm_parallel", "nn in range(8) -n 2 --threads 2 -r out", "report(nn)")
        check(shell.user_ns["out"], 2)
        shell.run_line_magic("shm_status", "")
        assert "2 x forkserver, 2 BLAS threads each" in capsys.readouterr().out
        with pytest.raises(UsageError, match="--threads must be an integer >= 1, got 0"):
            shell.run_cell_magic("shm_parallel", "nn in range(8) -n 2 --threads 0", "report(nn)")
    finally:
        shell.run_line_magic("unload_ext", "shm_kernel_safe")
        shell.user_ns.pop("out", None)
        shell.user_ns.pop("report", None)


def test_dask_cluster_workers_report_bounded_threads():
    pytest.importorskip("distributed")
    from shm_kernel_safe.transports.dask import cluster

    before = parent_state()
    try:
        reports = sks.parallel_map(report, range(20), backend="dask", processes=2)
        check(reports, threads_for(2))
        reports = sks.parallel_map(
            report, range(20), backend="dask", processes=2, threads_per_worker=2
        )
        check(reports, 2)
        assert cluster.local_threads() == 2
        assert any("2 BLAS threads each" in line for line in cluster.status_lines())
        with pytest.raises(sks.InvalidArgumentError, match="a given client's cluster"):
            sks.parallel_map(
                report, range(2), backend="dask", client=cluster.get_client(), threads_per_worker=1
            )
    finally:
        cluster.close_all()
    assert parent_state() == before
    deadline = time.monotonic() + 10
    while (alive := worker_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"dask processes left behind: {[p.pid for p in alive]}"
