"""Feature admission: a key earns a trainable row only after `filter_freq` sightings.

Most ids of a recommendation stream are seen once or twice and never again; giving each a
row (and publishing it to serving) costs memory and bandwidth for nothing. Two counters:
- `counter`: exact counts of the not-yet-admitted keys, in their own index; stale ones are
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
from trainer.embedding.keyindex import KeyIndex, claim, hash64, probe, release, upcoming_slot
from trainer.embedding.prefetch import AHEAD, prefetch

_SALT = np.int64(0x5BD1E9955BD1E995)


NONE, EXACT, BLOOM = 0, 1, 2
_NO_COUNTER = (np.full(16, -1, np.int64), np.zeros(16, np.int64), np.zeros(16, np.int64), np.zeros(3, np.int64),
               np.zeros(16, np.int32), np.zeros(16, np.uint32))
_NO_BLOOM = np.zeros(1, np.uint8)


class Admission:
    """Every key is admitted at first sight (filter_freq <= 1)."""

    def observe(self, keys: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        """Counts sightings of keys that have no row; True where a key is now admitted."""
        return np.ones(keys.size, dtype=np.bool_)

    def kernel_args(self, n: int) -> tuple:
        """Arguments of `observe_one` for a fused lookup kernel, with room for n new counters:
        (kind, table, slot_key, free, meta, counts, last_seen, bloom counters, hashes, freq)."""
        return (NONE, *_NO_COUNTER, _NO_BLOOM, 0, 0)

    def forget_stale(self, step: int, steps_to_live: int) -> None:
        """Drops counters of keys not seen for steps_to_live steps (no-op if not tracked)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return 0


@njit(cache=True, inline="always")
def count_one(table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray, counts: np.ndarray,
              last_seen: np.ndarray, key: np.int64, add: np.int64, step: np.int64, freq: np.int64) -> bool:
    """Finds or creates the key's counter, adds, and drops it once admitted (the row takes
    over; a key evicted later has to earn admission again). True when admitted."""
    pos, slot = probe(table, slot_key, key)
    total = add + (np.int64(counts[slot]) if slot >= 0 else np.int64(0))
    if total >= freq:
        if slot >= 0:
            counts[slot] = 0  # marks the slot free for _stale
            release(table, slot_key, free, meta, pos, slot)
        return True
    if slot < 0:
        slot = claim(table, slot_key, free, meta, key, pos)
        ahead = upcoming_slot(free, meta, AHEAD)
        if ahead >= 0:
            prefetch(slot_key, ahead)
            prefetch(counts, ahead)
            prefetch(last_seen, ahead)
    counts[slot] = total
    last_seen[slot] = np.uint32(step & 0xFFFFFFFF)
    return False


@njit(cache=True)
def _count(table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray, counts: np.ndarray,
           last_seen: np.ndarray, keys: np.ndarray, adds: np.ndarray, step: np.int64, freq: np.int64,
           admitted: np.ndarray) -> None:
    for i in range(keys.size):
        admitted[i] = count_one(table, slot_key, free, meta, counts, last_seen, keys[i], adds[i], step, freq)


@njit(cache=True)
def _stale(counts: np.ndarray, last_seen: np.ndarray, step: np.int64, steps_to_live: np.int64) -> np.ndarray:
    """Slots of counters (count > 0: in use) not seen for more than steps_to_live steps."""
    out = np.empty(counts.size, dtype=np.int64)
    n = 0
    for s in range(counts.size):
        if counts[s] > 0 and elapsed_steps(step, last_seen[s]) > steps_to_live:
            out[n] = s
            n += 1
    return out[:n]


class ExactAdmission(Admission):
    def __init__(self, filter_freq: int) -> None:
        self._freq = filter_freq
        self._index = KeyIndex(1024)
        self._counts = np.zeros(self._index.slot_capacity, dtype=np.int32)  # < filter_freq
        self._last_seen = np.zeros(self._index.slot_capacity, dtype=np.uint32)  # step mod 2^32

    def kernel_args(self, n: int) -> tuple:
        table, slot_key, free, meta = self._index.arrays(n)
        self._fit()
        return (EXACT, table, slot_key, free, meta, self._counts, self._last_seen, _NO_BLOOM, 0, self._freq)

    def observe(self, keys: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        table, slot_key, free, meta = self._index.arrays(keys.size)
        self._fit()
        admitted = np.empty(keys.size, dtype=np.bool_)
        _count(table, slot_key, free, meta, self._counts, self._last_seen, keys, counts, step, self._freq, admitted)
        return admitted

    def forget_stale(self, step: int, steps_to_live: int) -> None:
        hw = self._index.high_water
        slots = _stale(self._counts[:hw], self._last_seen[:hw], step, steps_to_live)
        self._index.remove(self._index.keys_of(slots))
        self._counts[slots] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        keys, slots = self._index.items()
        return {"keys": keys, "counts": self._counts[slots], "last_seen": self._last_seen[slots]}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._index = KeyIndex(max(1024, state["keys"].size))
        slots = self._index.put(state["keys"])
        self._counts = np.zeros(self._index.slot_capacity, dtype=np.int32)
        self._last_seen = np.zeros(self._index.slot_capacity, dtype=np.uint32)
        self._counts[slots] = state["counts"]
        self._last_seen[slots] = state["last_seen"]

    @property
    def nbytes(self) -> int:
        return self._index.nbytes + self._counts.nbytes + self._last_seen.nbytes

    def _fit(self) -> None:
        rows = self._index.slot_capacity
        if rows > self._counts.size:
            self._counts = np.resize(self._counts, rows)
            self._last_seen = np.resize(self._last_seen, rows)


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
        return (BLOOM, *_NO_COUNTER, self._counters, self._n_hashes, self._freq)

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
def observe_one(kind: np.int64, table: np.ndarray, slot_key: np.ndarray, free: np.ndarray, meta: np.ndarray,
                counts: np.ndarray, last_seen: np.ndarray, bloom: np.ndarray, n_hashes: np.int64, freq: np.int64,
                key: np.int64, add: np.int64, step: np.int64) -> bool:
    """One key's sightings, whichever the admission kind (`kernel_args` gives the arguments)."""
    if kind == EXACT:
        return count_one(table, slot_key, free, meta, counts, last_seen, key, add, step, freq)
    if kind == BLOOM:
        return bloom_one(bloom, n_hashes, freq, key, add)
    return True
