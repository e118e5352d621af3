"""The dask transport: runs on a dask.distributed cluster (the ``dask`` extra).

Importing this package does not import ``distributed``; only using it does.
"""
