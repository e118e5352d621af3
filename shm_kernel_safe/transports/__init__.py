"""Ways of running a run's chunks: ``local`` (a warm loky pool over shared
memory), ``dask`` (a dask.distributed cluster) and ``serial`` (the calling
process). Each implements :class:`~shm_kernel_safe.engine.transport.Transport`;
none imports another; :mod:`.registry` names them for ``backend=``."""
