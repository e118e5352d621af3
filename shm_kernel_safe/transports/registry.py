"""The transports ``backend=`` names: one line each.

Like joblib's ``register_parallel_backend`` and distributed's comm
registry: the API looks a transport up by name, the transport checks its
own options (:meth:`~shm_kernel_safe.engine.transport.Transport.check_options`)
and builds itself from them. A new transport is a subclass of
:class:`~shm_kernel_safe.engine.transport.Transport` and one line here.
"""

from __future__ import annotations

from .. import _checks
from ..engine.transport import Transport, TransportOptions
from ..errors import InvalidArgumentError
from .dask.transport import DaskTransport
from .local.transport import LocalTransport
from .serial import SerialTransport

TRANSPORTS: dict[str, type[Transport]] = {
    "local": LocalTransport,
    "dask": DaskTransport,
    "serial": SerialTransport,
}

#: Backend names of other libraries, and ours that does the same.
PEER_BACKENDS = {
    "loky": "local",
    "multiprocessing": "local",
    "processes": "local",
    "threading": "serial",
    "sequential": "serial",
    "distributed": "dask",
}


def checked(backend: str, options: TransportOptions) -> tuple[type[Transport], TransportOptions]:
    """The transport for ``backend`` and its options, checked; starts nothing."""
    if isinstance(backend, str) and backend in PEER_BACKENDS:
        ours = PEER_BACKENDS[backend]
        raise InvalidArgumentError(
            "backend",
            f"must be one of {', '.join(map(repr, TRANSPORTS))}, got {backend!r}; "
            f"did you mean backend={ours!r}?",
        )
    cls = TRANSPORTS[_checks.choice("backend", backend, TRANSPORTS)]
    return cls, cls.check_options(options)
