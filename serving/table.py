"""A serving node's embedding table: int64 key -> row, updated in place in O(rows changed).

Open addressing with linear probing (keys never collide: the full key is compared) and
backward-shift deletion, so probe chains stay short under constant upserts and
tombstones. Rows live in a dense array indexed by slot; freed slots are reused.

A serving node writes its tables in another process (`serving/applier.py`), in arrays of
shared memory (`RowTable(alloc=SharedArrays())`), and reads them through a `TableView` of
the same pages, mapped read-only; a table that outgrows its rows extends its arrays in place
when the allocator can (`Allocator.extend`), so the reader need not map them anew. A table is not safe to read while it is
written; the node keeps two of each (double buffering) and writes only those no request
reads. Every kernel is compiled with `nogil=True`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numba import njit

from trainer.embedding.keyindex import hash64
from trainer.embedding.prefetch import AHEAD, prefetch, prefetch_end

_EMPTY = np.int64(-1)
_MAX_LOAD = 0.5  # serving reads far more than it writes: short probe chains are worth the memory
LOOKUP_ARRAYS = ("buckets", "keys", "values")  # what a TableView needs of a RowTable
# Of those, what every lookup probes at random: a reader touches all of it before reading
# (the rows are read only where a key was written).
PROBED_ARRAYS = ("buckets",)



class Allocator(Protocol):
    """Where a RowTable's arrays live."""

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A zero-filled array."""
        ...

    def extend(self, array: np.ndarray, rows: int) -> np.ndarray | None:
        """`array` with `rows` rows in the same memory (its rows unchanged, the new ones zero),
        or None if it cannot grow in place."""
        ...


class NumpyArrays:
    """Numpy's memory: arrays never grow in place."""

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def extend(self, array: np.ndarray, rows: int) -> np.ndarray | None:
        return None


@njit(cache=True, nogil=True, inline="always")
def _home(key: np.int64, mask: np.int64) -> np.int64:
    return np.int64(hash64(key) & np.uint64(mask))  # the trainer's key hash


@njit(cache=True, nogil=True, inline="always")
def _find(buckets, keys, k, mask):
    """(bucket position, slot) of key k; slot < 0 when absent, and the position is then the
    empty bucket that ends its probe chain (where k would go)."""
    pos = _home(k, mask)
    while True:
        s = buckets[pos]
        if s < 0 or keys[s] == k:
            return pos, s
        pos = (pos + 1) & mask


@njit(cache=True, nogil=True)
def _gather(buckets, keys, values, query, default, out):
    mask = np.int64(buckets.size - 1)
    dim = values.shape[1]
    for i in range(query.size):
        _, slot = _find(buckets, keys, query[i], mask)
        if slot < 0:
            for d in range(dim):
                out[i, d] = default
        else:
            for d in range(dim):
                out[i, d] = values[slot, d]


@njit(cache=True, nogil=True)
def _upsert(buckets, keys, values, free, meta, new_keys, new_values):
    """meta = [size, high_water, free_top]. Bound by cache misses (bucket, key, row of each
    random key), so software-pipelined like the trainer's kernels: the bucket of the key
    2 * AHEAD on is requested, then the key and row of the key AHEAD on (measured here: 196
    ns/row without, 74-93 with: 1M rows in 26 tables, 100k-row deltas)."""
    mask = np.int64(buckets.size - 1)
    dim = values.shape[1]
    n = new_keys.size
    for i in range(n):
        if i + 2 * AHEAD < n:
            prefetch(buckets, _home(new_keys[i + 2 * AHEAD], mask))
        if i + AHEAD < n:
            ahead = buckets[_home(new_keys[i + AHEAD], mask)]
            if ahead >= 0:
                prefetch(keys, ahead)
                prefetch(values, ahead)
                prefetch_end(values, ahead)
        k = new_keys[i]
        pos, s = _find(buckets, keys, k, mask)
        if s < 0:
            if meta[2] > 0:
                meta[2] -= 1
                s = free[meta[2]]
            else:
                s = meta[1]
                meta[1] += 1
            keys[s] = k
            buckets[pos] = s
            meta[0] += 1
        for d in range(dim):
            values[s, d] = new_values[i, d]


@njit(cache=True, nogil=True)
def _remove(buckets, keys, free, meta, gone):
    mask = np.int64(buckets.size - 1)
    removed = 0
    for i in range(gone.size):
        pos, slot = _find(buckets, keys, gone[i], mask)
        if slot < 0:
            continue
        free[meta[2]] = slot
        meta[2] += 1
        meta[0] -= 1
        removed += 1
        hole = pos
        j = pos
        while True:
            j = (j + 1) & mask
            e = buckets[j]
            if e < 0:
                break
            home = _home(keys[e], mask)
            if hole <= j:
                stays = hole < home and home <= j
            else:
                stays = home > hole or home <= j
            if stays:
                continue
            buckets[hole] = e
            hole = j
        buckets[hole] = _EMPTY
    return removed


@njit(cache=True, nogil=True)
def _rehash(old, new, keys):
    mask = np.int64(new.size - 1)
    for e in old:
        if e < 0:
            continue
        pos = _home(keys[e], mask)
        while new[pos] >= 0:
            pos = (pos + 1) & mask
        new[pos] = e


@njit(cache=True, nogil=True)
def _copy_rows(dst, src):
    """dst[:len(src)] = src without holding the GIL (numpy's copy may hold it for a large array)."""
    flat_dst = dst.reshape(-1)
    flat_src = src.reshape(-1)
    for i in range(flat_src.size):
        flat_dst[i] = flat_src[i]


def _buckets_for(n: int) -> int:
    return 1 << max(4, int(np.ceil(np.log2(max(n, 1) / _MAX_LOAD + 1))))


def _lookup(buckets: np.ndarray, keys: np.ndarray, values: np.ndarray, default: float,
            query: np.ndarray) -> np.ndarray:
    query = _as_keys(query)
    out = np.empty((query.size, values.shape[1]), dtype=np.float32)
    _gather(buckets, keys, values, query, np.float32(default), out)
    return out


class RowTable:
    """int64 key -> float32 row of `dim`; absent keys read `default_value`. Its arrays come
    from `alloc` (numpy's by default; shared memory for a serving node)."""

    def __init__(self, dim: int, default_value: float = 0.0, capacity: int = 16,
                 alloc: Allocator | None = None) -> None:
        capacity = max(int(capacity), 16)
        self.dim = dim
        self.default_value = float(default_value)
        self._alloc: Allocator = alloc or NumpyArrays()
        self._buckets = self._new_buckets(_buckets_for(capacity))
        self._keys = self._alloc.zeros((capacity,), np.int64)
        self._values = self._alloc.zeros((capacity, dim), np.float32)
        self._free = self._alloc.zeros((capacity,), np.int64)
        self._meta = np.zeros(3, dtype=np.int64)

    @classmethod
    def build(cls, keys: np.ndarray, values: np.ndarray, default_value: float,
              alloc: Allocator | None = None) -> "RowTable":
        keys = _as_keys(keys)
        # Headroom: new keys in the next deltas should not make the first of them regrow the table.
        table = cls(values.shape[1] if values.ndim == 2 else 0, default_value, len(keys) * 5 // 4, alloc)
        table.upsert(keys, values)
        return table

    def __len__(self) -> int:
        return int(self._meta[0])

    @property
    def nbytes(self) -> int:
        return self._buckets.nbytes + self._keys.nbytes + self._values.nbytes + self._free.nbytes

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows of `keys` [n, dim] (a fresh array: it does not alias the table)."""
        return _lookup(self._buckets, self._keys, self._values, self.default_value, keys)

    def lookup_arrays(self) -> dict[str, np.ndarray]:
        """The arrays a `TableView` reads (by `LOOKUP_ARRAYS` name); they change when the table grows."""
        return {"buckets": self._buckets, "keys": self._keys, "values": self._values}

    def upsert(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = _as_keys(keys)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(keys.size, self.dim)
        self._reserve(keys.size)
        _upsert(self._buckets, self._keys, self._values, self._free, self._meta, keys, values)

    def remove(self, keys: np.ndarray) -> int:
        return int(_remove(self._buckets, self._keys, self._free, self._meta, _as_keys(keys)))

    def apply(self, upserts: np.ndarray, values: np.ndarray, tombstones: np.ndarray) -> None:
        """One delta: tombstones first, then upserts (a key evicted and re-admitted since the
        last version appears in both and must end up live)."""
        if len(tombstones):
            self.remove(tombstones)
        if len(upserts):
            self.upsert(upserts, values)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of every live entry, keys ascending."""
        slots = self._buckets[self._buckets >= 0]
        keys = self._keys[slots]
        order = np.argsort(keys, kind="stable")
        return keys[order], self._values[slots[order]]

    def copy(self) -> "RowTable":
        """An independent copy, its arrays from the same allocator."""
        other = RowTable.__new__(RowTable)
        other.dim, other.default_value, other._alloc = self.dim, self.default_value, self._alloc
        other._buckets = self._copied(self._buckets, self._buckets.shape[0])
        other._keys = self._copied(self._keys, self._keys.shape[0])
        other._values = self._copied(self._values, self._values.shape[0])
        other._free = self._copied(self._free, self._free.shape[0])
        other._meta = self._meta.copy()
        return other

    def _reserve(self, n: int) -> None:
        size = int(self._meta[0])
        if size + n > _MAX_LOAD * self._buckets.size:
            self._buckets = self._rehashed(_buckets_for(size + n))
        need = int(self._meta[1]) + max(0, n - int(self._meta[2]))
        if need > self._keys.size:
            rows = max(need, int(1.25 * self._keys.size))
            self._keys = self._grown(self._keys, rows)
            self._values = self._grown(self._values, rows)
            self._free = self._grown(self._free, rows)

    def _rehashed(self, n: int) -> np.ndarray:
        """The buckets rehashed into `n`: in place if the allocator can extend them (from a
        private copy of the old ones), else into new buckets."""
        buckets = self._alloc.extend(self._buckets, n)
        if buckets is None:
            buckets = self._new_buckets(n)
            _rehash(self._buckets, buckets, self._keys)
        else:
            old = self._buckets.copy()
            buckets.fill(_EMPTY)
            _rehash(old, buckets, self._keys)
        return buckets

    def _new_buckets(self, n: int) -> np.ndarray:
        buckets = self._alloc.zeros((n,), np.int64)
        buckets.fill(_EMPTY)
        return buckets

    def _grown(self, array: np.ndarray, rows: int) -> np.ndarray:
        """`array` with `rows` rows: extended in place if the allocator can, else copied."""
        out = self._alloc.extend(array, rows)
        return self._copied(array, rows) if out is None else out

    def _copied(self, array: np.ndarray, rows: int) -> np.ndarray:
        """A new array of `rows` rows from the allocator, starting with a copy of `array`."""
        out = self._alloc.zeros((rows,) + array.shape[1:], array.dtype)
        if array.size:
            _copy_rows(out, array)
        return out


class TableView:
    """Lookups over the arrays of a RowTable that another process writes, mapped read-only
    (`LOOKUP_ARRAYS`); the writer never writes them while a request reads them."""

    def __init__(self, default_value: float, arrays: dict[str, np.ndarray]) -> None:
        self.default_value = float(default_value)
        self.arrays = arrays
        self._buckets, self._keys, self._values = (arrays[name] for name in LOOKUP_ARRAYS)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows of `keys` [n, dim] (a fresh array)."""
        return _lookup(self._buckets, self._keys, self._values, self.default_value, keys)


def _as_keys(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
