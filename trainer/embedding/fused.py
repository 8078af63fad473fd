"""The training lookup of an Embedding Variable as one pass over the batch's keys.

Per key: one probe of the table's index; if absent, the admission count (its own probe) and,
once admitted, the claim of a slot in the bucket the first probe found, the seeded initial
row and its bookkeeping; then the row (or the default value) is copied out. Done as separate
vectorised steps this probed admitted keys three times and walked the keys five times, with
a dozen numpy temporaries and numba calls per table and step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from trainer.embedding.admission import observe_one
from trainer.embedding.kernels import init_row
from trainer.embedding.keyindex import _SLOT_BITS, _SLOT_MASK, _TAG_SHIFT, claim, hash64, probe, upcoming_slot
from trainer.embedding.prefetch import AHEAD, prefetch, prefetch_end


@njit(cache=True, inline="always")
def _candidate(table: np.ndarray, key: np.int64) -> np.int64:
    """The slot of the first entry on key's chain whose tag matches (almost surely the key's
    slot: tags are 23 bits), or -1; reads only the probe table, never slot_key."""
    mask = np.int64(table.size - 1)
    h = hash64(key)
    tag = np.int64(h >> _TAG_SHIFT) << _SLOT_BITS
    pos = np.int64(h & np.uint64(mask))
    while True:
        entry = table[pos]
        if entry < 0:
            return np.int64(-1)
        if (entry & ~_SLOT_MASK) == tag:
            return entry & _SLOT_MASK
        pos = (pos + 1) & mask


@njit(cache=True)
def train_lookup(table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray,
                 a_kind: np.int64, a_buckets: np.ndarray, a_meta: np.ndarray, bloom: np.ndarray,
                 n_hashes: np.int64, freq: np.int64,
                 keys: np.ndarray, adds: np.ndarray, step: np.int64, seed: np.int64, std: np.float32,
                 stamp: np.int64, default: np.float32,
                 values: np.ndarray, last_step: np.ndarray, stamps: np.ndarray,
                 slots: np.ndarray, new_slots: np.ndarray, out: np.ndarray,
                 start: np.int64, resumed: bool, max_size: np.int64) -> tuple[np.int64, np.int64]:
    """Slots of keys[start:] into `slots` (-1: not admitted) and their rows into `out`; rows
    created now go to new_slots[:n] (their optimizer state is the caller's). Returns (n, i):
    i < keys.size when key i needs a row and the index is full (max_size keys, or no free
    slot below the slot capacity, which `values` must have): grow it, call again from i with
    `resumed` (key i was admitted already; counting it again would lose that)."""
    low = np.uint32(step & 0xFFFFFFFF)
    seed_hash = hash64(seed)
    dim = values.shape[1]
    mask = np.uint64(table.size - 1)
    a_mask = np.uint64(a_buckets.shape[0] - 1)
    n_new = 0
    for i in range(start, keys.size):
        # Software pipeline: the home bucket of the key 2 * AHEAD on, then, its bucket having
        # arrived, the row (and key) of the key AHEAD on or, if it has none, its admission
        # bucket: the work on key i then finds its lines in cache.
        if i + 2 * AHEAD < keys.size:
            prefetch(table, hash64(keys[i + 2 * AHEAD]) & mask)
        if i + AHEAD < keys.size:
            slot = _candidate(table, keys[i + AHEAD])
            if slot >= 0:
                prefetch(slot_key, slot)
                prefetch(values, slot)
                prefetch_end(values, slot)
            elif a_kind == 1:
                prefetch(a_buckets, hash64(keys[i + AHEAD]) & a_mask)
        key = keys[i]
        pos, slot = probe(table, slot_key, key)
        if slot < 0 and ((i == start and resumed) or observe_one(
                a_kind, a_buckets, a_meta, bloom, n_hashes, freq, key, adds[i], step)):
            if meta[0] >= max_size or (meta[2] == 0 and meta[1] >= slot_key.size):
                return n_new, i  # full: key i is admitted (counted), the next call resumes there
            slot = claim(table, slot_key, free, meta, key, pos)
            ahead = upcoming_slot(free, meta, AHEAD)
            if ahead >= 0:
                prefetch(slot_key, ahead)
                prefetch(values, ahead)
                prefetch_end(values, ahead)
                prefetch(last_step, ahead)
                prefetch(stamps, ahead)
            init_row(seed_hash, key, std, values, slot)
            last_step[slot] = low
            stamps[slot] = stamp
            new_slots[n_new] = slot
            n_new += 1
        slots[i] = slot
        if slot < 0:
            for j in range(dim):
                out[i, j] = default
        else:
            for j in range(dim):
                out[i, j] = values[slot, j]
    return n_new, keys.size
