"""Our own LocalCluster cannot be entered by another process of this
machine: it speaks TLS with temporary credentials only this process and the
cluster hold. A client without them cannot connect, let alone run code;
ours, which holds them, works as usual."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("distributed")
pytest.importorskip("cryptography")

import shm_kernel_safe as sks
from shm_kernel_safe.transports.dask import cluster as dask_cluster

from ..helpers import run_python, worker_children

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

INTRUDER = r"""
import json, os, socket, sys
from distributed import Client, Security

address, marker = sys.argv[1], sys.argv[2]
host, port = address.split("://")[1].rsplit(":", 1)


def touch(path):
    open(path, "w").close()
    return os.getpid()


def attempt(label, addr, **kwargs):
    try:
        c = Client(addr, timeout=3, set_as_default=False, **kwargs)
    except BaseException as exc:
        return label, f"refused: {type(exc).__name__}"
    try:
        c.submit(touch, marker, pure=False).result(timeout=10)
        c.run(touch, marker)
        return label, "ran code"
    except BaseException as exc:
        return label, f"connected, could not run: {type(exc).__name__}"
    finally:
        c.close()


results = dict([
    attempt("no credentials", address),
    attempt("plain tcp", "tcp://" + address.split("://")[1]),
    attempt("credentials of its own", address, security=Security.temporary()),
])
# a raw connection speaking distributed's protocol gets no answer it can use
s = socket.create_connection((host, int(port)), timeout=3)
s.sendall(b"\x00" * 64)
s.settimeout(3)
try:
    reply = s.recv(64)
except OSError as exc:
    reply = type(exc).__name__.encode()
results["raw socket"] = "no usable reply" if not reply.startswith(b"\x00") else "answered"
print(json.dumps(results))
"""


def test_our_cluster_refuses_clients_without_its_credentials(tmp_path):
    client = dask_cluster.get_client(None, processes=2)
    try:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:"), address
        assert client.security.require_encryption
        marker = tmp_path / "intruder-ran-code"
        proc = run_python(INTRUDER, address, str(marker), timeout=90)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        assert all(v.startswith("refused") for k, v in results.items() if k != "raw socket"), (
            results
        )
        assert results["raw socket"] == "no usable reply", results
        assert not marker.exists()
        # ours still works, on the same cluster
        y = sks.parallel_map(lambda i: i * 2, range(100), backend="dask", processes=2)
        assert y.tolist() == [i * 2 for i in range(100)]
        assert dask_cluster.get_client(None, processes=2) is client
    finally:
        dask_cluster.close_all()
    deadline = time.monotonic() + 10
    while (alive := worker_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"dask processes left behind: {[p.pid for p in alive]}"


def test_tls_can_be_turned_off_for_our_cluster(monkeypatch):
    from shm_kernel_safe.transports.dask import security as dask_security

    monkeypatch.setenv(dask_security.ENV_TLS, "0")
    assert not dask_security.local_cluster_security().require_encryption
    monkeypatch.setenv(dask_security.ENV_TLS, "1")
    assert dask_security.local_cluster_security().require_encryption


def test_missing_cryptography_is_a_one_line_error(monkeypatch):
    import builtins

    from shm_kernel_safe.errors import DaskBackendError
    from shm_kernel_safe.transports.dask import security as dask_security

    real_import = builtins.__import__

    def no_cryptography(name, *args, **kwargs):
        if name.startswith("cryptography"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv(dask_security.ENV_TLS, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cryptography)
    with pytest.raises(DaskBackendError, match="cryptography") as info:
        dask_security.local_cluster_security()
    assert "\n" not in str(info.value)
