"""Every transport, as pytest fixtures: a test that takes ``kw`` runs once per
transport (local under each start method, dask, serial). A new transport is
one more line in ``BACKENDS``."""

from __future__ import annotations

import time

import pytest

from .helpers import cluster_sems, loky_sems, settle, worker_children

BACKENDS = [
    pytest.param({"backend": "local", "start_method": "forkserver"}, id="local-forkserver"),
    pytest.param({"backend": "local", "start_method": "spawn"}, id="local-spawn"),
    pytest.param({"backend": "local", "start_method": "fork"}, id="local-fork"),
    pytest.param({"backend": "dask"}, id="dask"),
    pytest.param({"backend": "serial"}, id="serial"),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """parallel_map keyword arguments that select one transport.

    Module-scoped, so pytest runs every test on one transport before the
    next: our dask cluster (2 workers on loopback) is started once, and is
    gone, with all its processes, before the next transport's tests.
    """
    options = dict(request.param)
    if options["backend"] == "local":
        options["processes"] = 2
    if options["backend"] != "dask":
        yield options
        return
    pytest.importorskip("distributed")
    from shm_kernel_safe.transports.dask import cluster

    cluster.get_client(None, processes=2)
    yield options
    held = cluster_sems()
    cluster.close_all()
    deadline = time.monotonic() + 10
    while (alive := worker_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"dask processes left behind: {[p.cmdline() for p in alive]}"
    left = settle(lambda: loky_sems() & held)
    assert not left, f"our dask cluster's semaphores outlived it: {sorted(left)}"


@pytest.fixture
def kw(backend, request):
    """The options of :func:`backend`, for one test: local and serial runs
    must leave no process behind; dask's workers live for the module."""
    if backend["backend"] != "dask":
        request.getfixturevalue("no_orphans")
    return backend
