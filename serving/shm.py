"""Arrays in anonymous shared memory files, so that one process writes a table and another
reads the very same pages.

The applier process (`serving/applier.py`) writes the embedding tables of both buffers into
such arrays; the serving worker maps them read-only and only swaps which buffer requests
read. Each array is its own anonymous file (memfd on Linux): it has no name, in /dev/shm
or anywhere, so nothing is left behind when either process dies; the memory is freed when
the last mapping of it goes.

Each file is `RESERVE` times the array's first size, and both processes map all of it once:
a table that outgrows its rows gets them in place (`SharedArrays.extend`, `extended`), with
no new file, no new mapping and no row touched, and its buckets double in place. The reserve
is address space, not memory: a memory file holds pages only where they were written or
read, and nothing reads past an array's rows. (A new file per growth made the worker map and touch all 52 key and value
arrays of a 26-table node, 107 MB per buffer, in the version where they all outgrew their
rows: 48-60 ms of its CPU, against ~0.7 ms for any other version.)
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile

import numpy as np
from numba import njit

# An array's memory file, and both mappings of it, are this many times its first size: it
# grows in place until then (a table grows by 1.25x at a time: 9 growths), then moves to a
# new file. Address space is plentiful on 64-bit (128 TiB), and costs no memory.
RESERVE = 8


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

    `zeros()` allocates, `extend()` grows an array in place; `take_new()` hands over the
    descriptors of arrays allocated since the previous call and forgets the rest: an array
    allocated and dropped in between (a table that grew twice in one delta) is freed then,
    and one handed over once is never again (an array extended in place is the same array)."""

    def __init__(self) -> None:
        # data address -> (mapping, descriptor); the mapping is kept so that the address
        # cannot be reused by another array before take_new
        self._new: dict[int, tuple[mmap.mmap, int]] = {}

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        size = _reserved(count * dtype.itemsize)
        fd = memory_file(size)
        mapping = mmap.mmap(fd, size)
        array = np.frombuffer(mapping, dtype, count=count).reshape(shape)
        self._new[array.ctypes.data] = (mapping, fd)
        return array

    def extend(self, array: np.ndarray, rows: int) -> np.ndarray | None:
        """`array` with `rows` rows in the same memory (its rows unchanged, the new ones zero),
        or None when its memory file has no room for them."""
        shape = (rows,) + array.shape[1:]
        return extended(array, shape) if math.prod(shape) * array.itemsize <= len(_mapping_of(array)) else None

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


def _reserved(nbytes: int) -> int:
    """The size of the memory file for an array of `nbytes`: RESERVE times, in whole pages (a
    mapping cannot be empty)."""
    return max(1, -(-nbytes * RESERVE // mmap.PAGESIZE)) * mmap.PAGESIZE


def _mapping_of(array: np.ndarray) -> mmap.mmap:
    """The mapping an array of this module is a view of (from offset 0)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap):
        raise TypeError("not an array over a memory file's mapping")
    return base


def extended(array: np.ndarray, shape: tuple[int, ...], touch: bool = False) -> np.ndarray:
    """A view of `shape` over the mapping `array` is a view of, from the same address: what a
    table that grew in place looks like, in the process that writes it or one that maps it.
    With `touch`, the added pages are touched as in `map_read_only` (for what every lookup
    probes, the buckets); without, rows added later are faulted in by the first request
    that reads them, a few pages per version (touching them all at once would also allocate
    pages nothing was written to: reading a hole of a memory file allocates it)."""
    mapping = _mapping_of(array)
    count = math.prod(shape)
    if count * array.itemsize > len(mapping):
        raise ValueError(f"{shape} x {array.dtype} does not fit a memory file of {len(mapping)} bytes")
    if touch:
        added = max(0, count * array.itemsize - array.nbytes)
        _touch(np.frombuffer(mapping, np.uint8, count=added, offset=array.nbytes), mmap.PAGESIZE)
    return np.frombuffer(mapping, array.dtype, count=count).reshape(shape)


@njit(cache=True, nogil=True)
def _touch(data: np.ndarray, page: int) -> int:
    total = 0
    for i in range(0, data.size, page):
        total += data[i]
    return total


def map_read_only(fd: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array another process wrote into memory file `fd`, as a read-only view of the same
    pages; the whole file is mapped, reserve included, so that the array can be `extended`.
    The descriptor is closed; the mapping keeps the memory.

    Every page of the array (not of the reserve: that would allocate it) is touched once
    here, without the GIL, so that the first requests reading a buffer after a swap do not
    take its page faults (~16k per 64 MB); MAP_POPULATE would do it inside mmap(), which holds
    the GIL (27 ms for 256 MB, measured)."""
    try:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        size = os.fstat(fd).st_size
        if size < count * dtype.itemsize or size == 0:
            raise ValueError(f"memory file of {size} bytes for an array of {count} x {dtype}")
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    _touch(np.frombuffer(mapping, np.uint8, count=count * dtype.itemsize), mmap.PAGESIZE)
    return np.frombuffer(mapping, dtype, count=count).reshape(shape)
