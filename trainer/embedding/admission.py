"""Feature admission: a key earns a trainable row only after `filter_freq` sightings.

Most ids of a recommendation stream are seen once or twice and never again; giving each a
row (and publishing it to serving) costs memory and bandwidth for nothing. Two counters:
- `counter`: exact counts of the not-yet-admitted keys, in their own table; stale ones are
  forgotten by the table's steps_to_live eviction, which bounds its memory.
- `bloom`: a counting Bloom filter of fixed size, from bloom_capacity and bloom_fp_rate.
  A false positive admits a key early, never late. Counters saturate at filter_freq (all
  that matters) so they never wrap, and use the smallest dtype that holds it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from trainer.embedding.config import AdmissionConfig
from trainer.embedding.kernels import elapsed_steps
from trainer.embedding.keyindex import hash64, stays
from trainer.embedding.prefetch import AHEAD, prefetch

_SALT = np.int64(0x5BD1E9955BD1E995)


NONE, EXACT, BLOOM = 0, 1, 2
_NO_COUNTERS = np.zeros((16, 2), np.int64)  # kernel arguments where there are no exact counters
_NO_COUNTER_META = np.zeros(1, np.int64)
_NO_BLOOM = np.zeros(1, np.uint8)


class Admission:
    """Every key is admitted at first sight (filter_freq <= 1)."""

    def observe(self, keys: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        """Counts sightings of keys that have no row; True where a key is now admitted."""
        return np.ones(keys.size, dtype=np.bool_)

    def kernel_args(self, n: int) -> tuple:
        """Arguments of `observe_one` for a fused lookup kernel, with room for n new counters:
        (kind, counter buckets, their meta, bloom counters, hashes, freq)."""
        return (NONE, _NO_COUNTERS, _NO_COUNTER_META, _NO_BLOOM, 0, 0)

    def forget_stale(self, step: int, steps_to_live: int) -> None:
        """Drops counters of keys not seen for steps_to_live steps (no-op if not tracked)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return 0


# -- exact counters: an open-addressing table of 16-byte buckets ------------------------------
#
# A bucket is [key, count << 32 | step mod 2^32 of the last sighting]; a zero second word is
# an empty bucket (a stored count is >= 1). The key sits in the bucket, so counting a key is
# one cache line: through a KeyIndex (probe table -> slot -> slot_key, counts, last_seen
# arrays) it was four dependent misses, and about half the keys of a Zipf stream's batch
# take this path. Linear probing with backward-shift deletion, as KeyIndex does.

_COUNT_SHIFT = np.int64(32)
_LOW32 = np.int64(0xFFFFFFFF)
_COUNTER_MAX_LOAD = 0.6


@njit(cache=True, inline="always")
def _find_counter(buckets: np.ndarray, key: np.int64) -> tuple[np.int64, bool]:
    """(bucket of key, True) or (the empty bucket ending its chain, False)."""
    mask = np.int64(buckets.shape[0] - 1)
    pos = np.int64(hash64(key) & np.uint64(mask))
    while True:
        if buckets[pos, 1] == 0:
            return pos, False
        if buckets[pos, 0] == key:
            return pos, True
        pos = (pos + 1) & mask


@njit(cache=True, inline="always")
def _drop_counter(buckets: np.ndarray, meta: np.ndarray, hole: np.int64) -> None:
    """Empties bucket `hole`, shifting back the later entries of its run whose home bucket
    is not in (hole, j], so no chain is broken (no tombstones to rot under churn)."""
    mask = np.int64(buckets.shape[0] - 1)
    meta[0] -= 1
    j = hole
    while True:
        j = (j + 1) & mask
        if buckets[j, 1] == 0:
            break
        if stays(hole, j, np.int64(hash64(buckets[j, 0]) & np.uint64(mask))):
            continue
        buckets[hole, 0] = buckets[j, 0]
        buckets[hole, 1] = buckets[j, 1]
        hole = j
    buckets[hole, 1] = 0


@njit(cache=True, inline="always")
def count_one(buckets: np.ndarray, meta: np.ndarray, key: np.int64, add: np.int64, step: np.int64,
              freq: np.int64) -> bool:
    """Finds or creates the key's counter, adds, and drops it once admitted (the row takes
    over; a key evicted later has to earn admission again). True when admitted. The caller
    has made room for a new counter (`ExactAdmission.kernel_args`)."""
    pos, found = _find_counter(buckets, key)
    total = add + (buckets[pos, 1] >> _COUNT_SHIFT if found else np.int64(0))
    if total >= freq:
        if found:
            _drop_counter(buckets, meta, pos)
        return True
    if total <= 0:
        return False  # nothing seen: nothing to store (a zero count would read as empty)
    if not found:
        buckets[pos, 0] = key
        meta[0] += 1
    buckets[pos, 1] = (total << _COUNT_SHIFT) | (step & _LOW32)
    return False


@njit(cache=True)
def _count(buckets: np.ndarray, meta: np.ndarray, keys: np.ndarray, adds: np.ndarray, step: np.int64,
           freq: np.int64, admitted: np.ndarray) -> None:
    mask = np.uint64(buckets.shape[0] - 1)
    for i in range(keys.size):
        if i + AHEAD < keys.size:
            prefetch(buckets, hash64(keys[i + AHEAD]) & mask)
        admitted[i] = count_one(buckets, meta, keys[i], adds[i], step, freq)


@njit(cache=True)
def _forget_stale(buckets: np.ndarray, meta: np.ndarray, step: np.int64, steps_to_live: np.int64) -> None:
    """Drops, in one sweep, every counter not seen for more than steps_to_live steps. A drop
    may shift a later entry into the bucket just dropped, so that bucket is looked at again."""
    i = 0
    while i < buckets.shape[0]:
        word = buckets[i, 1]
        if word != 0 and elapsed_steps(step, np.uint32(word & _LOW32)) > steps_to_live:
            _drop_counter(buckets, meta, np.int64(i))
            continue
        i += 1


@njit(cache=True)
def _rehash_counters(old: np.ndarray, new: np.ndarray) -> None:
    mask = np.int64(new.shape[0] - 1)
    for i in range(old.shape[0]):
        if old[i, 1] == 0:
            continue
        pos = np.int64(hash64(old[i, 0]) & np.uint64(mask))
        while new[pos, 1] != 0:
            pos = (pos + 1) & mask
        new[pos, 0] = old[i, 0]
        new[pos, 1] = old[i, 1]


def _counter_buckets(n: int) -> np.ndarray:
    """Empty buckets, a power of two that holds n counters under the maximum load."""
    size = 1 << max(10, int(np.ceil(np.log2(max(n, 1) / _COUNTER_MAX_LOAD + 1))))
    return np.zeros((size, 2), dtype=np.int64)


class ExactAdmission(Admission):
    def __init__(self, filter_freq: int) -> None:
        self._freq = filter_freq
        self._buckets = _counter_buckets(0)
        self._meta = np.zeros(1, dtype=np.int64)  # counters held

    def kernel_args(self, n: int) -> tuple:
        self._reserve(n)
        return (EXACT, self._buckets, self._meta, _NO_BLOOM, 0, self._freq)

    def observe(self, keys: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        self._reserve(keys.size)
        admitted = np.empty(keys.size, dtype=np.bool_)
        _count(self._buckets, self._meta, np.ascontiguousarray(keys, np.int64),
               np.ascontiguousarray(counts, np.int64), step, self._freq, admitted)
        return admitted

    def forget_stale(self, step: int, steps_to_live: int) -> None:
        _forget_stale(self._buckets, self._meta, step, steps_to_live)

    def state_dict(self) -> dict[str, np.ndarray]:
        held = self._buckets[self._buckets[:, 1] != 0]
        return {"keys": held[:, 0].copy(), "counts": (held[:, 1] >> _COUNT_SHIFT).astype(np.int32),
                "last_seen": (held[:, 1] & _LOW32).astype(np.uint32)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        keys = np.asarray(state["keys"], dtype=np.int64)
        held = np.empty((keys.size, 2), dtype=np.int64)
        held[:, 0] = keys
        held[:, 1] = (np.asarray(state["counts"], np.int64) << _COUNT_SHIFT) | np.asarray(state["last_seen"], np.int64)
        if keys.size and (held[:, 1] >> _COUNT_SHIFT).min() < 1:
            raise ValueError("admission counters must be >= 1")
        self._buckets = _counter_buckets(keys.size)
        _rehash_counters(held, self._buckets)
        self._meta[0] = keys.size

    @property
    def nbytes(self) -> int:
        return self._buckets.nbytes

    def _reserve(self, n: int) -> None:
        if self._meta[0] + n > _COUNTER_MAX_LOAD * self._buckets.shape[0]:
            buckets = _counter_buckets(int(self._meta[0]) + n)
            _rehash_counters(self._buckets, buckets)
            self._buckets = buckets


@njit(cache=True, inline="always")
def bloom_one(counters: np.ndarray, n_hashes: np.int64, cap: np.int64, key: np.int64, add: np.int64) -> bool:
    """Conservative update: raise only the counters below the new estimate, which keeps
    estimates of colliding keys lower than plain increments would. True when admitted."""
    m = np.uint64(counters.size)
    h1 = hash64(key)
    h2 = hash64(key ^ _SALT) | np.uint64(1)
    estimate = cap
    for k in range(n_hashes):
        c = np.int64(counters[(h1 + np.uint64(k) * h2) % m])
        estimate = min(estimate, c)
    estimate = min(estimate + add, cap)
    for k in range(n_hashes):
        pos = (h1 + np.uint64(k) * h2) % m
        if counters[pos] < estimate:
            counters[pos] = estimate
    return estimate >= cap


@njit(cache=True)
def _bloom_observe(counters: np.ndarray, n_hashes: np.int64, cap: np.int64, keys: np.ndarray,
                   counts: np.ndarray, admitted: np.ndarray) -> None:
    for i in range(keys.size):
        admitted[i] = bloom_one(counters, n_hashes, cap, keys[i], counts[i])


class BloomAdmission(Admission):
    def __init__(self, filter_freq: int, capacity: int, fp_rate: float) -> None:
        self._freq = filter_freq
        size = math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2)
        self._n_hashes = max(1, round(size / capacity * math.log(2)))
        dtype = np.uint8 if filter_freq <= 0xFF else np.uint16 if filter_freq <= 0xFFFF else np.uint32
        self._counters = np.zeros(size, dtype=dtype)

    def kernel_args(self, n: int) -> tuple:
        return (BLOOM, _NO_COUNTERS, _NO_COUNTER_META, self._counters, self._n_hashes, self._freq)

    def observe(self, keys: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        admitted = np.empty(keys.size, dtype=np.bool_)
        _bloom_observe(self._counters, self._n_hashes, self._freq, keys, counts, admitted)
        return admitted

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"counters": self._counters}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state["counters"].shape != self._counters.shape:
            raise ValueError("bloom filter size differs from the configured one")
        self._counters = state["counters"].astype(self._counters.dtype, copy=True)

    @property
    def nbytes(self) -> int:
        return self._counters.nbytes


def make_admission(config: AdmissionConfig) -> Admission:
    if config.filter_freq <= 1:
        return Admission()
    if config.kind == "bloom":
        return BloomAdmission(config.filter_freq, config.bloom_capacity, config.bloom_fp_rate)
    return ExactAdmission(config.filter_freq)


@njit(cache=True, inline="always")
def observe_one(kind: np.int64, buckets: np.ndarray, meta: np.ndarray, bloom: np.ndarray, n_hashes: np.int64,
                freq: np.int64, key: np.int64, add: np.int64, step: np.int64) -> bool:
    """One key's sightings, whichever the admission kind (`kernel_args` gives the arguments)."""
    if kind == EXACT:
        return count_one(buckets, meta, key, add, step, freq)
    if kind == BLOOM:
        return bloom_one(bloom, n_hashes, freq, key, add)
    return True
