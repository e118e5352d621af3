"""Credentials for our own dask ``LocalCluster``: mutual TLS, in memory only.

A cluster on ``tcp://127.0.0.1:<port>`` without authentication lets every
process of every user on the machine connect a ``distributed.Client`` and
run code as the kernel's user. Our cluster therefore speaks ``tls://`` with
credentials made for it alone by distributed's own
``Security.temporary()``: a fresh self-signed key and certificate (RSA 2048)
that every role (scheduler, workers, our client) must present and that
every role checks against (``ssl.CERT_REQUIRED``). They live in the memory
of the kernel and of the cluster's processes (handed to worker processes
through the nanny's process pipe); distributed writes them to disk only for
the instant ``ssl`` loads them, in a private (mode 0700) temporary directory
it deletes at once. A process without them cannot complete a handshake, let
alone submit a task.

Clusters given by the user (``client=`` / ``--scheduler``) are used exactly
as their owner configured them.

``SHM_KERNEL_SAFE_DASK_TLS=0`` in the environment turns this off for our
own cluster (plain ``tcp://`` on loopback), e.g. to measure what
TLS costs (``benchmarks/bench_dask.py --tls both``).
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import DaskBackendError

#: Environment variable: "0" starts our own LocalCluster without TLS.
ENV_TLS = "SHM_KERNEL_SAFE_DASK_TLS"


def tls_enabled() -> bool:
    """Whether our own ``LocalCluster`` is started with TLS (the default).

    Returns
    -------
    bool
        False only when ``SHM_KERNEL_SAFE_DASK_TLS`` is ``0``, ``false``,
        ``no`` or ``off``.
    """
    return os.environ.get(ENV_TLS, "1").strip().lower() not in ("0", "false", "no", "off")


def local_cluster_security(tls: bool | None = None) -> Any:
    """The ``distributed.Security`` for a new LocalCluster of ours.

    Parameters
    ----------
    tls : bool, optional
        Force TLS on or off; by default :func:`tls_enabled` decides.

    Returns
    -------
    distributed.Security
        Fresh temporary credentials (``require_encryption=True``), or an
        empty ``Security()`` (plain TCP) when TLS is off.

    Raises
    ------
    DaskBackendError
        When TLS is on and ``cryptography`` (needed to make the
        certificate) is missing.
    """
    from distributed import Security

    if not (tls_enabled() if tls is None else tls):
        return Security()
    try:
        return Security.temporary()
    except ImportError:
        raise DaskBackendError(
            "our local dask cluster uses TLS, which needs the 'cryptography' package: "
            f"pip install 'shm_kernel_safe[dask]' (or set {ENV_TLS}=0 for plain TCP on loopback)"
        ) from None
