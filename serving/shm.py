"""Arrays in anonymous shared memory files, so that one process writes a table and another
reads the very same pages.

The applier process (`serving/applier.py`) writes the embedding tables of both buffers into
such arrays; the serving worker maps them read-only and only swaps which buffer requests
read. Each array is its own anonymous file (memfd on Linux): it has no name, in /dev/shm
or anywhere, so nothing is left behind when either process dies; the memory is freed when
the last mapping of it goes.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile

import numpy as np
from numba import njit


def memory_file(size: int) -> int:
    """The descriptor of a new anonymous file of `size` zero bytes."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("freshrec", os.MFD_CLOEXEC)
    else:  # no memfd: an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


class SharedArrays:
    """An array allocator (for `RowTable`) whose arrays can be mapped by another process.

    `zeros()` allocates; `take_new()` hands over the descriptors of arrays allocated since the
    previous call and forgets the rest: an array allocated and dropped in between (a table
    that grew twice in one delta) is freed then, and one handed over once is never again."""

    def __init__(self) -> None:
        # data address -> (mapping, descriptor); the mapping is kept so that the address
        # cannot be reused by another array before take_new
        self._new: dict[int, tuple[mmap.mmap, int]] = {}

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        fd = memory_file(max(1, count * dtype.itemsize))  # a mapping cannot be empty
        mapping = mmap.mmap(fd, max(1, count * dtype.itemsize))
        array = np.frombuffer(mapping, dtype, count=count).reshape(shape)
        self._new[array.ctypes.data] = (mapping, fd)
        return array

    def take_new(self, arrays: list[np.ndarray]) -> list[int | None]:
        """For each array, its descriptor if it was allocated since the last call (the caller
        closes it once sent), else None."""
        fds = [self._new.pop(a.ctypes.data, (None, None))[1] for a in arrays]
        for _, fd in self._new.values():
            os.close(fd)
        self._new.clear()
        return fds

    def close(self) -> None:
        self.take_new([])


@njit(cache=True, nogil=True)
def _touch(data: np.ndarray, page: int) -> int:
    total = 0
    for i in range(0, data.size, page):
        total += data[i]
    return total


def map_read_only(fd: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array another process wrote into memory file `fd`, as a read-only view of the same
    pages. The descriptor is closed; the mapping keeps the memory.

    Every page is touched once here, without the GIL, so that the first requests reading a
    buffer after a swap do not take its page faults (~16k per 64 MB); MAP_POPULATE would do
    it inside mmap(), which holds the GIL (27 ms for 256 MB, measured)."""
    try:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        size = os.fstat(fd).st_size
        if size < count * dtype.itemsize or size == 0:
            raise ValueError(f"memory file of {size} bytes for an array of {count} x {dtype}")
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    _touch(np.frombuffer(mapping, np.uint8), mmap.PAGESIZE)
    return np.frombuffer(mapping, dtype, count=count).reshape(shape)
