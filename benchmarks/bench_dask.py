"""The dask backend against the local backend, on the hourly workload, in one process.

    python benchmarks/bench_dask.py --rows 1000000 [--mode ms|tiny] [--repeats 5]

Same x and tasks as ``bench_hourly.py`` (8760 tasks, ~1 ms or ~20 us each).
Contenders are interleaved round by round (rotated order) so the machine's
drift falls on all of them; medians, reported as ratios to the local
backend and as per-task overhead ``(wall - serial / P) / N``:

* local backend, x auto-shared per call (what a user gets by default);
* dask backend (``parallel_map(..., backend="dask")``) on a 2-process
  loopback LocalCluster: with x unchanged since the last call (found on the
  cluster by content, not sent) and with x changed in place before each
  call (hashed, found changed, sent to every worker once);
* dask the way people write it first: x scattered once (broadcast), then
  ``client.map`` with one dask task per item, results gathered.

Also printed: the bytes a call moves per worker and per task, which is
what decides how the backend scales with workers.

``--tls-cost`` measures only what TLS costs our LocalCluster: two clusters
made the same way, one with temporary TLS credentials (our default) and one
on plain TCP (``SHM_KERNEL_SAFE_DASK_TLS=0``), interleaved round by round:
a call of 8760 empty items (dispatch), sending ``x`` to every worker, and a
call of the workload with ``x`` kept on the cluster; medians, TLS / TCP.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import pickle
import statistics
import sys
import time

import cloudpickle
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_hourly

import shm_kernel_safe as sks
from shm_kernel_safe.engine.pickling import DEFAULT_THRESHOLD
from shm_kernel_safe.engine.run import Run
from shm_kernel_safe.engine.transport import Inputs
from shm_kernel_safe.transports.dask import cluster as dask_cluster
from shm_kernel_safe.transports.dask.kept import content_name
from shm_kernel_safe.transports.dask.transport import DaskTransport
from shm_kernel_safe.transports.dask.worker import Aligned, DaskChunk

cloudpickle.register_pickle_by_value(bench_hourly)
N_TASKS = bench_hourly.N_TASKS
work = bench_hourly.work


def main() -> None:
    parser = bench_hourly.workload_args(__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-naive",
        action="store_true",
        help="leave out client.map with one task per item (~30 s a round)",
    )
    parser.add_argument(
        "--tls-cost",
        action="store_true",
        help="only compare our LocalCluster with TLS (default) and without",
    )
    args = parser.parse_args()
    P, R = args.processes, args.repeats
    sks.tune_malloc()
    if args.tls_cost:
        tls_cost(args)
        return

    x = np.random.default_rng(0).standard_normal((args.rows, 16))
    target = 1e-3 if args.mode == "ms" else 20e-6
    k, _ = bench_hourly.calibrate(x, target)
    fn = functools.partial(work, x, k=k)
    ref = np.array([fn(nn) for nn in range(N_TASKS)])
    print(
        f"x: {x.shape} float64 = {x.nbytes / 2**20:.0f} MiB; {N_TASKS} tasks of {k} rows; "
        f"{P} processes / dask workers; medians of {R}",
        flush=True,
    )

    t0 = time.perf_counter()
    client = dask_cluster.get_client(None, processes=P)
    cluster_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert np.allclose(sks.parallel_map(fn, range(N_TASKS), backend="dask"), ref)
    dask_first = time.perf_counter() - t0

    def naive_dask():
        x_future = client.scatter(x, broadcast=True, hash=False)
        futures = client.map(lambda nn, xx: work(xx, nn, k), range(N_TASKS), xx=x_future)
        out = client.gather(futures)
        del futures, x_future
        return out

    x_changing = x.copy()
    flips = iter(range(args.rows))

    def dask_x_changed():
        # abs() in work() hides the sign: results stay equal, bytes do not.
        # One more element flipped each call, so the content is new every
        # time (flipping one element back and forth would return to x's
        # own content, which the cluster already holds).
        x_changing[next(flips), 0] *= -1
        return sks.parallel_map(
            functools.partial(work, x_changing, k=k), range(N_TASKS), backend="dask"
        )

    contenders = {
        "serial loop": lambda: [fn(nn) for nn in range(N_TASKS)],
        "local backend, x auto-shared per call": lambda: sks.parallel_map(
            fn, range(N_TASKS), processes=P
        ),
        "dask backend, x unchanged (kept on the cluster)": lambda: sks.parallel_map(
            fn, range(N_TASKS), backend="dask"
        ),
        "dask backend, x changed in place (sent again)": dask_x_changed,
        "dask client.map, one task per item (x scattered once)": naive_dask,
    }
    if args.skip_naive:
        del contenders["dask client.map, one task per item (x scattered once)"]
    names = list(contenders)
    for name in names:  # warm everything, check every answer
        assert np.allclose(contenders[name](), ref), name
    results: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(R):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            contenders[name]()
            results[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(v) for name, v in results.items()}

    # fixed costs: a call of empty tasks (dispatch only), sending x to all
    # workers, and the content hash that tells whether x must be sent
    def scatter_x():
        client.scatter(Aligned(x), broadcast=True, hash=False).release()

    digest_s, _ = bench_hourly.timed(lambda: content_name(x), R)

    empty_local, _ = bench_hourly.timed(
        lambda: sks.parallel_map(int, range(N_TASKS), processes=P), R
    )
    empty_dask, _ = bench_hourly.timed(
        lambda: sks.parallel_map(int, range(N_TASKS), backend="dask"), R
    )
    scatter_s, _ = bench_hourly.timed(scatter_x, R)

    # what one call moves: per worker (payload + arrays, once) and per task
    call = DaskTransport(processes=P)
    try:
        Run(fn, range(N_TASKS), call, inputs=Inputs(DEFAULT_THRESHOLD)).execute()
        per_worker = len(call.payload) + sum(a.nbytes for a in call.arrays.values())
        n_chunks = len(call.chunks)
        spec = DaskChunk(call.call_id, 0, 0, 1)
        per_task_out = len(pickle.dumps(spec)) + 3 * 64  # spec + three future keys
        per_task_back = len(pickle.dumps(call.finished[1])) / call.chunks[1].size
    finally:
        call.release()
    dask_cluster.close_all()

    serial = times["serial loop"]
    local = times["local backend, x auto-shared per call"]
    print(f"\n{'contender':56s} {'median s':>9s} {'vs local':>9s} {'us/task':>8s}")
    overhead = {}
    for name in names:
        t = times[name]
        overhead[name] = (t - serial / P) / N_TASKS * 1e6
        ratio = local / t
        print(f"{name:56s} {t:9.3f} {ratio:8.2f}x {overhead[name]:8.1f}")
    print(
        f"\nstarting the LocalCluster: {cluster_start:.2f} s; first dask call "
        f"{dask_first:.2f} s (workers cold)"
    )
    print(
        f"{N_TASKS} empty tasks: local {empty_local * 1e3:.0f} ms, dask {empty_dask * 1e3:.0f} ms; "
        f"sending x to {P} workers (scatter, broadcast): {scatter_s * 1e3:.0f} ms; "
        f"hashing x to know whether to send it: {digest_s * 1e3:.0f} ms"
    )
    print(
        f"bytes per worker per call: {per_worker / 2**20:.1f} MiB (payload + x), sent once; "
        f"per task: ~{per_task_out} B out, ~{per_task_back:.0f} B back per item; "
        f"{n_chunks} chunks for {N_TASKS} items"
    )
    out = {
        "rows": args.rows,
        "mode": args.mode,
        "k": k,
        "repeats": R,
        "times": times,
        "all_times": results,
        "overhead_us": overhead,
        "dask_vs_local": local / times["dask backend, x unchanged (kept on the cluster)"],
        "dask_changed_vs_local": local / times["dask backend, x changed in place (sent again)"],
        "naive_vs_local": local
        / times.get("dask client.map, one task per item (x scattered once)", float("nan")),
        "cluster_start_s": cluster_start,
        "dask_first_call_s": dask_first,
        "bytes_per_worker_per_call": per_worker,
        "bytes_per_task_out": per_task_out,
        "bytes_per_item_back": per_task_back,
        "chunks": n_chunks,
        "empty_local_ms": empty_local * 1e3,
        "empty_dask_ms": empty_dask * 1e3,
        "scatter_x_ms": scatter_s * 1e3,
        "digest_x_ms": digest_s * 1e3,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


def _our_cluster(tls: bool, processes: int):
    """A LocalCluster and Client made as ``get_client(None)`` makes ours."""
    import dask
    import distributed

    from shm_kernel_safe.transports.dask import security as dask_security
    from shm_kernel_safe.transports.dask.worker import InterruptsToTheKernel, MallocTuning

    os.environ[dask_security.ENV_TLS] = "1" if tls else "0"
    cluster = dask_cluster._start_local_cluster(distributed, dask, processes)
    client = distributed.Client(cluster, set_as_default=False)
    client.register_plugin(MallocTuning())
    client.register_plugin(InterruptsToTheKernel())
    assert client.scheduler.address.startswith("tls://" if tls else "tcp://")
    return cluster, client


def tls_cost(args) -> None:
    """TLS against plain TCP on our own LocalCluster, same process, interleaved."""
    P, R = args.processes, args.repeats
    x = np.random.default_rng(0).standard_normal((args.rows, 16))
    target = 1e-3 if args.mode == "ms" else 20e-6
    k, _ = bench_hourly.calibrate(x, target)
    fn = functools.partial(work, x, k=k)
    clusters = {tls: _our_cluster(tls, P) for tls in (True, False)}
    label = {True: "TLS", False: "TCP"}
    try:

        def empty(client):
            return sks.parallel_map(int, range(N_TASKS), backend="dask", client=client)

        def send_x(client):
            client.scatter(Aligned(x), broadcast=True, hash=False).release()

        def workload(client):
            return sks.parallel_map(fn, range(N_TASKS), backend="dask", client=client)

        measures = {"8760 empty items": empty, "send x to every worker": send_x}
        measures[f"workload, x kept ({args.mode} tasks)"] = workload
        for tls in clusters:  # warm: workers, imports, x kept on each cluster
            for measure in measures.values():
                measure(clusters[tls][1])
        times: dict[str, dict[bool, list[float]]] = {m: {True: [], False: []} for m in measures}
        for rnd in range(R):
            for name, measure in measures.items():
                order = (True, False) if rnd % 2 == 0 else (False, True)
                for tls in order:
                    gc.collect()
                    t0 = time.perf_counter()
                    measure(clusters[tls][1])
                    times[name][tls].append(time.perf_counter() - t0)
    finally:
        for cluster, client in clusters.values():
            client.close()
            cluster.close()
    print(
        f"x: {x.shape} float64 = {x.nbytes / 2**20:.0f} MiB; {P} workers per cluster; "
        f"medians of {R} interleaved rounds"
    )
    print(f"\n{'measure':40s} {'TLS ms':>9s} {'TCP ms':>9s} {'TLS / TCP':>10s}")
    out = {"rows": args.rows, "mode": args.mode, "repeats": R, "all_times": {}}
    for name, by in times.items():
        med = {tls: statistics.median(v) for tls, v in by.items()}
        ratio = med[True] / med[False]
        print(f"{name:40s} {med[True] * 1e3:9.1f} {med[False] * 1e3:9.1f} {ratio:9.2f}x")
        out[name] = {label[t]: med[t] for t in med} | {"tls_over_tcp": ratio}
        out["all_times"][name] = {label[t]: by[t] for t in by}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
