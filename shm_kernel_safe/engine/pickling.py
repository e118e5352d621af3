"""The pickler every transport builds on: cloudpickle with a say over arrays.

``cloudpickle`` sends functions and classes defined in a notebook or a
console's ``__main__`` by value, which is what makes them work under spawn.
:class:`ArrayPickler` extends it with ``reducer_override`` (the same hook
joblib's memmapping reducer uses) so that each transport decides how the
numeric arrays found anywhere in a payload travel: the local transport as
handles to shared memory, dask as keys of data scattered once per worker.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle
import numpy as np

from ..memory.arrays import SharedArray, handle_of

#: Arrays at least this many bytes travel by a transport's own means, not inline.
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB


class ArrayPickler(cloudpickle.Pickler):
    """cloudpickle, with every numeric ndarray offered to :meth:`reduce_array`.

    A :class:`SharedArray` handle found in the payload (closed over by the
    function) is offered as the array it describes. Subclasses decide what
    an array becomes on the wire; ``None`` pickles it inline as usual.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            reduced = self.reduce_array(obj, handle_of(obj))
            if reduced is not None:
                return reduced
        elif isinstance(obj, SharedArray):
            reduced = self.reduce_array(None, obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)

    def reduce_array(self, arr: np.ndarray | None, handle: SharedArray | None) -> tuple | None:
        """How ``arr`` travels: a reduce tuple, or None to pickle it inline.

        ``arr`` is None for a bare handle (not attached here), ``handle`` is
        None for an array outside our shared memory.
        """
        raise NotImplementedError
