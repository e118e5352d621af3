"""What an array holds, in 16 bytes, at near memory speed.

One content check for the whole package: the share cache
(:mod:`~shm_kernel_safe.memory.share_cache`) uses it to tell whether an
array is still what it shared last time, and the dask transport to name
the inputs a cluster keeps. It is xxHash's XXH3 with a 128-bit result
(the ``xxhash`` binding): a non-cryptographic hash that reads memory about
as fast as memory can be read (7.5-12 GB/s on this project's 2-core
machine, under load) where SHA-1 reaches 0.9-1.1 GB/s. A 128-bit digest
makes an accidental collision between two contents of one array
(~2^-128) far less likely than a memory error; nobody here is an
adversary forging collisions against their own kernel.

The digest covers the array's elements in logical order (C order; an
F-contiguous array is hashed as its contiguous transpose, as its shared
copy is F-contiguous too), not its layout: callers compare shape, strides
and dtype themselves.
"""

from __future__ import annotations

import numpy as np
import xxhash

#: Bytes hashed per step for arrays that are not contiguous.
BLOCK_BYTES = 1 << 22


def digest(arr: np.ndarray) -> bytes:
    """The XXH3-128 digest of ``arr``'s bytes, in logical element order.

    Parameters
    ----------
    arr : numpy.ndarray
        Any numeric array; non-contiguous arrays are hashed block by block
        (copies of at most :data:`BLOCK_BYTES` at a time).

    Returns
    -------
    bytes
        16 bytes.
    """
    if arr.flags.f_contiguous and not arr.flags.c_contiguous:
        arr = arr.T
    if arr.flags.c_contiguous:
        return xxhash.xxh3_128_digest(memoryview(arr.reshape(-1).view(np.uint8)))
    h = xxhash.xxh3_128()
    if arr.ndim == 0 or arr.size == 0:
        return h.digest()
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, arr.shape[0], step):
        block = np.ascontiguousarray(arr[start : start + step])
        h.update(memoryview(block.reshape(-1).view(np.uint8)))
    return h.digest()


def hexdigest(arr: np.ndarray) -> str:
    """:func:`digest` as 32 hexadecimal characters."""
    return digest(arr).hex()
