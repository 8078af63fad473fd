"""Collision-free int64 key -> int64 slot index: open addressing, linear probing, growth.

A Python dict does ~1.4 M keys/s here; these numba kernels do tens of millions, which is
what keeps the hash lookup out of the trainer's critical path.

Layout, chosen for memory (each live row of a table pays for it):
- `slot_key[slot]` holds the key of each slot: it is the row's key, stored once.
- the probe table holds one int64 per bucket: `tag << 40 | slot`, -1 when empty. The tag
  is 23 high bits of the key's hash, so a probe rejects another key without reading
  `slot_key` (no second cache miss) in all but ~1 in 8 million cases.
Deletion shifts later entries back (no tombstones), so probe chains never rot under the
constant insert/evict churn of an online trainer.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from trainer.embedding.prefetch import AHEAD, prefetch

_SLOT_BITS = np.int64(40)
_SLOT_MASK = np.int64((1 << 40) - 1)
_TAG_SHIFT = np.uint64(41)
_EMPTY = np.int64(-1)
_MAX_LOAD = 0.75
_SLOT_GROWTH = 1.125

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


@njit(cache=True, inline="always")
def hash64(key: np.int64) -> np.uint64:
    """MurmurHash3's finaliser: consecutive ids spread over all buckets and all tags."""
    x = np.uint64(key)
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
    return x


@njit(cache=True, inline="always")
def probe(table: np.ndarray, slot_key: np.ndarray, key: np.int64) -> tuple[np.int64, np.int64]:
    """(bucket, slot) of `key`, or (first empty bucket on its chain, -1)."""
    mask = np.int64(table.size - 1)
    h = hash64(key)
    tag = np.int64(h >> _TAG_SHIFT) << _SLOT_BITS
    pos = np.int64(h & np.uint64(mask))
    while True:
        entry = table[pos]
        if entry < 0:
            return pos, _EMPTY
        if (entry & ~_SLOT_MASK) == tag:
            slot = entry & _SLOT_MASK
            if slot_key[slot] == key:
                return pos, slot
        pos = (pos + 1) & mask


@njit(cache=True)
def _get(table: np.ndarray, slot_key: np.ndarray, keys: np.ndarray, out: np.ndarray) -> None:
    mask = np.uint64(table.size - 1)
    for i in range(keys.size):
        if i + AHEAD < keys.size:
            prefetch(table, hash64(keys[i + AHEAD]) & mask)
        out[i] = probe(table, slot_key, keys[i])[1]


@njit(cache=True, inline="always")
def claim(table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray,
          key: np.int64, pos: np.int64) -> np.int64:
    """Inserts `key` at the empty bucket `pos` that _probe found; returns its new slot.
    meta = [size, high_water, free_top]; freed slots are reused first."""
    if meta[2] > 0:
        meta[2] -= 1
        slot = free[meta[2]]
    else:
        slot = meta[1]
        meta[1] += 1
    slot_key[slot] = key
    table[pos] = (np.int64(hash64(key) >> _TAG_SHIFT) << _SLOT_BITS) | slot
    meta[0] += 1
    return slot


@njit(cache=True, inline="always")
def upcoming_slot(free: np.ndarray, meta: np.ndarray, k: np.int64) -> np.int64:
    """The freed slot the k-th claim from now takes if nothing is released meanwhile, or -1
    when that claim gets a never-used slot. Loops that claim prefetch its lines that many
    claims early: freed slots are scattered over the table, never-used ones come in order
    (which the hardware prefetcher follows)."""
    top = meta[2] - 1 - k
    return free[top] if top >= 0 else np.int64(-1)


@njit(cache=True, inline="always")
def stays(hole: np.int64, j: np.int64, home: np.int64) -> bool:
    """Backward-shift deletion in linear probing: whether the entry at bucket j, whose home
    bucket is `home`, keeps its place when bucket `hole` empties (its home lies cyclically
    in (hole, j]); otherwise it moves into the hole."""
    return (hole <= j and hole < home <= j) or (hole > j and (home > hole or home <= j))


@njit(cache=True, inline="always")
def release(table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray,
            hole: np.int64, slot: np.int64) -> None:
    """Removes the entry at bucket `hole` (holding `slot`), shifting back the later entries
    of its run whose home bucket is not in (hole, j], so no probe chain is ever broken."""
    mask = np.int64(table.size - 1)
    free[meta[2]] = slot
    meta[2] += 1
    meta[0] -= 1
    j = hole
    while True:
        j = (j + 1) & mask
        entry = table[j]
        if entry < 0:
            break
        if stays(hole, j, np.int64(hash64(slot_key[entry & _SLOT_MASK]) & np.uint64(mask))):
            continue
        table[hole] = entry
        hole = j
    table[hole] = _EMPTY


@njit(cache=True)
def _put(table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray,
         keys: np.ndarray, out: np.ndarray, is_new: np.ndarray) -> None:
    for i in range(keys.size):
        pos, slot = probe(table, slot_key, keys[i])
        is_new[i] = slot < 0
        out[i] = claim(table, slot_key, free, meta, keys[i], pos) if slot < 0 else slot


@njit(cache=True)
def _remove(table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray,
            keys: np.ndarray, out: np.ndarray) -> None:
    mask = np.uint64(table.size - 1)
    for i in range(keys.size):
        if i + AHEAD < keys.size:
            prefetch(table, hash64(keys[i + AHEAD]) & mask)
        hole, slot = probe(table, slot_key, keys[i])
        out[i] = slot
        if slot >= 0:
            release(table, slot_key, free, meta, hole, slot)


@njit(cache=True)
def _rehash(old: np.ndarray, new: np.ndarray, slot_key: np.ndarray) -> None:
    mask = np.int64(new.size - 1)
    for entry in old:
        if entry < 0:
            continue
        pos = np.int64(hash64(slot_key[entry & _SLOT_MASK]) & np.uint64(mask))
        while new[pos] >= 0:
            pos = (pos + 1) & mask
        new[pos] = entry


def _table_size(n: int) -> int:
    """Smallest power of two that holds n keys under the maximum load factor."""
    return 1 << max(4, int(np.ceil(np.log2(max(n, 1) / _MAX_LOAD + 1))))


class KeyIndex:
    """int64 key -> int64 slot (-1 when absent). Slots are dense and reused after removal,
    so they can index the rows of a table directly (trainer and serving nodes alike)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._table = np.full(_table_size(capacity), _EMPTY, dtype=np.int64)
        self._slot_key = np.zeros(max(capacity, 16), dtype=np.int64)
        self._free = np.zeros(0, dtype=np.int64)
        self._meta = np.zeros(3, dtype=np.int64)  # size, high water, free-stack top

    def __len__(self) -> int:
        return int(self._meta[0])

    @property
    def slot_capacity(self) -> int:
        """Rows a table indexed by these slots must have room for."""
        return self._slot_key.size

    @property
    def max_size(self) -> int:
        """Keys the probe table holds before it must grow (its maximum load)."""
        return int(_MAX_LOAD * self._table.size)

    @property
    def high_water(self) -> int:
        """One past the highest slot ever handed out."""
        return int(self._meta[1])

    @property
    def nbytes(self) -> int:
        return self._table.nbytes + self._slot_key.nbytes + self._free.nbytes

    def get(self, keys: np.ndarray) -> np.ndarray:
        keys = as_keys(keys)
        out = np.empty(keys.size, dtype=np.int64)
        _get(self._table, self._slot_key, keys, out)
        return out

    def put(self, keys: np.ndarray) -> np.ndarray:
        """Slots of `keys`, inserting the absent ones."""
        return self.insert(keys)[0]

    def insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots, is_new): like put, and tells which keys were inserted by this call."""
        keys = as_keys(keys)
        self._reserve(keys.size)
        out = np.empty(keys.size, dtype=np.int64)
        is_new = np.empty(keys.size, dtype=np.bool_)
        _put(self._table, self._slot_key, self._free, self._meta, keys, out, is_new)
        return out, is_new

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Removes keys; returns their former slots (-1 for absent keys), now free for reuse."""
        keys = as_keys(keys)
        self._reserve_removals(keys.size)
        out = np.empty(keys.size, dtype=np.int64)
        _remove(self._table, self._slot_key, self._free, self._meta, keys, out)
        return out

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, slots) of all entries, in slot order."""
        slots = np.sort(self._table[self._table >= 0] & _SLOT_MASK)
        return self._slot_key[slots], slots

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        return self._slot_key[slots]

    def arrays(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(table, slot_key, free, meta) with room for n inserts and n removals, for kernels
        that combine probe/claim/release with their own per-slot work in one pass."""
        self._reserve(n)
        self._reserve_removals(n)
        return self._table, self._slot_key, self._free, self._meta

    def _reserve_removals(self, n: int) -> None:
        need = int(self._meta[2]) + n
        if need > self._free.size:
            self._free = grown(self._free, max(need, 2 * self._free.size))

    def _reserve(self, n: int) -> None:
        """Room for n more keys, in the probe table and in slots (free ones count)."""
        size = int(self._meta[0])
        if (size + n) > _MAX_LOAD * self._table.size:
            table = np.full(_table_size(size + n), _EMPTY, dtype=np.int64)
            _rehash(self._table, table, self._slot_key)
            self._table = table
        need = int(self._meta[1]) + max(0, n - int(self._meta[2]))
        if need > self._slot_key.size:
            self._slot_key = grown(self._slot_key, max(need, int(_SLOT_GROWTH * self._slot_key.size)))


def grown(array: np.ndarray, rows: int) -> np.ndarray:
    """A copy of `array` with `rows` rows; the new ones are zero. Cache-line aligned, as
    `aligned_zeros`."""
    out = aligned_zeros((rows,) + array.shape[1:], array.dtype)
    out[: array.shape[0]] = array
    return out


_LINE = 64


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros whose first element starts a cache line. numpy aligns to 16 bytes only, so
    a 64-byte row (16 float32s) would straddle two lines: two misses per row visit, not one."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + _LINE, dtype=np.uint8)
    skip = -raw.ctypes.data % _LINE
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def as_keys(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
