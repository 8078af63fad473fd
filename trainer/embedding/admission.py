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
from trainer.embedding.keyindex import KeyIndex, hash64

_SALT = np.int64(0x5BD1E9955BD1E995)


class Admission:
    """Every key is admitted at first sight (filter_freq <= 1)."""

    def observe(self, keys: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        """Counts sightings of keys that have no row; True where a key is now admitted."""
        return np.ones(keys.size, dtype=np.bool_)

    def forget_stale(self, step: int, steps_to_live: int) -> None:
        """Drops counters of keys not seen for steps_to_live steps (no-op if not tracked)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return 0


class ExactAdmission(Admission):
    def __init__(self, filter_freq: int) -> None:
        self._freq = filter_freq
        self._index = KeyIndex(1024)
        self._counts = np.zeros(self._index.slot_capacity, dtype=np.int64)
        self._last_seen = np.zeros(self._index.slot_capacity, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def observe(self, keys: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
        slots, is_new = self._index.insert(keys)
        self._fit()
        self._counts[slots[is_new]] = 0
        self._counts[slots] += counts
        self._last_seen[slots] = step
        admitted = self._counts[slots] >= self._freq
        self._index.remove(keys[admitted])
        return admitted

    def forget_stale(self, step: int, steps_to_live: int) -> None:
        keys, slots = self._index.items()
        self._index.remove(keys[step - self._last_seen[slots] > steps_to_live])

    def state_dict(self) -> dict[str, np.ndarray]:
        keys, slots = self._index.items()
        return {"keys": keys, "counts": self._counts[slots], "last_seen": self._last_seen[slots]}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._index = KeyIndex(max(1024, state["keys"].size))
        slots = self._index.put(state["keys"])
        self._counts = np.zeros(self._index.slot_capacity, dtype=np.int64)
        self._last_seen = np.zeros(self._index.slot_capacity, dtype=np.int64)
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


@njit(cache=True)
def _bloom_observe(counters: np.ndarray, n_hashes: np.int64, cap: np.int64, keys: np.ndarray,
                   counts: np.ndarray, admitted: np.ndarray) -> None:
    """Conservative update: raise only the counters below the new estimate, which keeps
    estimates of colliding keys lower than plain increments would."""
    m = np.uint64(counters.size)
    for i in range(keys.size):
        h1 = hash64(keys[i])
        h2 = hash64(keys[i] ^ _SALT) | np.uint64(1)
        estimate = cap
        for k in range(n_hashes):
            c = np.int64(counters[(h1 + np.uint64(k) * h2) % m])
            estimate = min(estimate, c)
        estimate = min(estimate + counts[i], cap)
        for k in range(n_hashes):
            pos = (h1 + np.uint64(k) * h2) % m
            if counters[pos] < estimate:
                counters[pos] = estimate
        admitted[i] = estimate >= cap


class BloomAdmission(Admission):
    def __init__(self, filter_freq: int, capacity: int, fp_rate: float) -> None:
        self._freq = filter_freq
        size = math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2)
        self._n_hashes = max(1, round(size / capacity * math.log(2)))
        dtype = np.uint8 if filter_freq <= 0xFF else np.uint16 if filter_freq <= 0xFFFF else np.uint32
        self._counters = np.zeros(size, dtype=dtype)

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
