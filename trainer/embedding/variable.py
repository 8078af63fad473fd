"""The Embedding Variable: a growing, collision-free int64-keyed table of trainable rows.

Rows live in slot-indexed arrays (values, optimizer state, last-update step, change stamp)
found through a KeyIndex. Freed slots are reused, so memory follows the live rows, not the
ids ever seen.

Change tracking for the publisher: every mutation stamps its rows with the open epoch
`_clock`; a cut (`changes_since`) closes the epoch and returns all rows stamped after the
caller's cursor. A stamp is one int64 per row, so no number of updates between cuts can
overflow it (Monolith's bounded touched-key set drops updates when it overflows).
Evictions go to a tombstone log, trimmed by `release` once a cursor is durably published.

Thread safety: every public method holds the table's lock, so a publisher thread may cut
while the trainer thread steps. Without it a cut could close the epoch between an update
reading the open epoch and stamping its rows, and that update would never be published.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from trainer.embedding import fused, kernels
from trainer.embedding.admission import make_admission
from trainer.embedding.config import EmbeddingVariableConfig
from trainer.embedding.keyindex import KeyIndex, aligned_zeros, as_keys, grown
from trainer.embedding.optimizers import SparseOptimizer

_KEY_BYTES = 8


@dataclass(frozen=True)
class TableChanges:
    """What changed since a cursor. Apply tombstones first, then upsert keys/values."""

    keys: np.ndarray
    values: np.ndarray
    tombstones: np.ndarray
    cursor: int


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@njit(cache=True)
def _eviction_mask(stamps: np.ndarray, last_step: np.ndarray, values: np.ndarray, step: np.int64,
                   steps_to_live: np.int64, l2_threshold: float) -> np.ndarray:
    """Live rows (stamp > 0) idle for more than steps_to_live steps or with an L2 norm under
    the threshold; one pass, no temporaries the size of the table."""
    out = np.zeros(stamps.size, dtype=np.bool_)
    threshold_sq = l2_threshold * l2_threshold
    for s in range(stamps.size):
        if stamps[s] <= 0:
            continue
        if steps_to_live > 0 and kernels.elapsed_steps(step, last_step[s]) > steps_to_live:
            out[s] = True
        elif l2_threshold > 0:
            sq = 0.0
            for j in range(values.shape[1]):
                sq += values[s, j] * values[s, j]
            out[s] = sq < threshold_sq
    return out


class EmbeddingVariable:
    def __init__(self, config: EmbeddingVariableConfig) -> None:
        self.config = config
        self.dim = config.dim
        self._default = np.float32(config.default_value)
        self._optimizer = SparseOptimizer(config.optimizer, config.dim)
        self._admission = make_admission(config.admission)
        self._lock = threading.RLock()
        self._reset(config.initial_capacity)

    def _reset(self, capacity: int) -> None:
        self._index = KeyIndex(capacity)
        rows = self._index.slot_capacity
        self._values = aligned_zeros((rows, self.dim), np.float32)
        self._state = {name: aligned_zeros((rows,) + shape, dtype)
                       for name, (shape, dtype) in self._optimizer.layout().items()}
        self._last_step = np.zeros(rows, dtype=np.uint32)  # step mod 2^32 of the last update
        self._stamps = np.zeros(rows, dtype=np.int64)  # 0: free slot
        self._clock = 1  # the open epoch: stamp of changes made now
        self._step = 0  # the latest global step seen
        self._last_eviction = 0
        self._tomb_keys = np.zeros(0, dtype=np.int64)
        self._tomb_stamps = np.zeros(0, dtype=np.int64)
        self._tomb_compacted = 0
        self._lookup_cache: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._index)

    @property
    def index(self) -> KeyIndex:
        return self._index

    # -- training -------------------------------------------------------------------------

    @_locked
    def train_lookup(self, keys: np.ndarray, counts: np.ndarray | None = None,
                     out: np.ndarray | None = None) -> torch.Tensor:
        """Rows of a batch's unique keys, counting sightings and creating admitted rows;
        unadmitted keys read the default value. The rows are written to `out` (a C-contiguous
        float32 [keys, dim] array, e.g. a table's part of a pooling.RowBuffer) or to a fresh
        array, and returned as a tensor sharing its memory."""
        given = keys
        keys = as_keys(keys)
        n = keys.size
        adds = np.ones(n, np.int64) if counts is None else np.ascontiguousarray(counts, np.int64).reshape(-1)
        slots = np.empty(n, dtype=np.int64)
        new_slots = np.empty(n, dtype=np.int64)
        if out is None:
            out = np.empty((n, self.dim), dtype=np.float32)
        elif out.shape != (n, self.dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(n, self.dim)}")
        admission = self._admission.kernel_args(n)
        start, grow = 0, 0
        while start < n:
            # Room is reserved only when the kernel runs out of it: reserving for every key
            # of the batch would grow the table ahead of its rows.
            index = self._index.arrays(grow)
            self._fit_rows()
            created, stop = fused.train_lookup(
                *index, *admission, keys, adds, self._step, self.config.seed, np.float32(self.config.init_std),
                self._clock, self._default, self._values, self._last_step, self._stamps, slots, new_slots[start:],
                out, start, grow > 0, self._index.max_size)
            if created:
                self._optimizer.init_rows(self._state, new_slots[start:start + created])
            start, grow = stop, n - stop
        self._lookup_cache = (given, slots)
        return torch.from_numpy(out)

    @_locked
    def apply_gradients(self, keys: np.ndarray, grads: torch.Tensor | np.ndarray, step: int) -> None:
        """Updates the admitted rows among `keys` (unique); others' gradients are dropped.
        `step` is the global step of this update (1 for the first): steps_to_live counts from
        it, and adagrad_decay decays when step // decay_step passes a row's decay count,
        as DeepRec does with its global_step + 1.

        Given the very array passed to the preceding train_lookup (not modified since), the
        slots found then are reused: the hash probe is paid once per batch, not twice."""
        cache, self._lookup_cache = self._lookup_cache, None
        slots = cache[1] if cache is not None and cache[0] is keys else None
        keys = as_keys(keys)
        if isinstance(grads, torch.Tensor):
            grads = grads.detach().cpu().numpy()
        grads = np.ascontiguousarray(grads, dtype=np.float32).reshape(keys.size, self.dim)
        self._step = max(self._step, step)
        if slots is None:
            slots = self._index.get(keys)
        self._optimizer.update(self._values, self._state, slots, grads, step, self._last_step, self._stamps,
                               self._clock)

    @_locked
    def lookup(self, keys: np.ndarray) -> torch.Tensor:
        """Read-only: rows or the default value, shaped keys.shape + (dim,)."""
        keys = np.asarray(keys)
        return self._gather(self._index.get(keys)).reshape(*keys.shape, self.dim)

    @_locked
    def pooled_lookup(self, keys: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
        """Read-only sum-pooling of bags keys[offsets[b]:offsets[b + 1]] (multi-valued
        features at serving time), without materialising one row per key."""
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        out = np.empty((offsets.size - 1, self.dim), dtype=np.float32)
        kernels.gather_sum(self._values, self._index.get(keys), offsets, self._default, out)
        return torch.from_numpy(out)

    def initial_rows(self, keys: np.ndarray) -> np.ndarray:
        """The values rows of these keys start from when created (a pure function of seed, key)."""
        keys = as_keys(keys)
        out = np.empty((keys.size, self.dim), dtype=np.float32)
        kernels.init_rows(keys, np.arange(keys.size), self.config.seed, np.float32(self.config.init_std), out)
        return out

    def _gather(self, slots: np.ndarray) -> torch.Tensor:
        out = np.empty((slots.size, self.dim), dtype=np.float32)
        kernels.gather(self._values, slots, self._default, out)
        return torch.from_numpy(out)

    def _fit_rows(self) -> None:
        """Row arrays follow the index's slot capacity (it owns the growth policy)."""
        rows = self._index.slot_capacity
        if rows > self._stamps.size:
            self._values = grown(self._values, rows)
            self._state = {name: grown(array, rows) for name, array in self._state.items()}
            self._last_step = grown(self._last_step, rows)
            self._stamps = grown(self._stamps, rows)

    # -- eviction -------------------------------------------------------------------------

    @_locked
    def maybe_evict(self, step: int) -> int:
        """Evicts if every_n_steps have passed since the last run; returns rows evicted."""
        if step - self._last_eviction < self.config.eviction.every_n_steps:
            return 0
        return int(self.evict(step).size)

    @_locked
    def evict(self, step: int) -> np.ndarray:
        """Removes idle and small rows now; returns their keys (tombstones for serving)."""
        ev = self.config.eviction
        self._step = max(self._step, step)
        self._last_eviction = step
        self._lookup_cache = None
        if ev.steps_to_live:
            self._admission.forget_stale(step, ev.steps_to_live)
        if not (ev.steps_to_live or ev.l2_threshold):
            return np.zeros(0, dtype=np.int64)
        hw = self._index.high_water
        slots = np.flatnonzero(_eviction_mask(self._stamps[:hw], self._last_step[:hw], self._values[:hw],
                                              step, ev.steps_to_live, ev.l2_threshold))
        keys = self._index.keys_of(slots)
        self._index.remove(keys)
        self._stamps[slots] = 0
        self._log_tombstones(keys)
        return keys

    def _log_tombstones(self, keys: np.ndarray) -> None:
        self._tomb_keys = np.concatenate([self._tomb_keys, keys])
        self._tomb_stamps = np.concatenate([self._tomb_stamps, np.full(keys.size, self._clock, np.int64)])
        if self._tomb_keys.size > 2 * max(self._tomb_compacted, len(self), 1024):
            self._compact_tombstones()

    def _compact_tombstones(self) -> None:
        """Keeps each key's latest eviction, and only for keys not live again (a live key's
        current row reaches consumers as an upsert, which supersedes the tombstone). This
        bounds the log by the distinct dead keys since the oldest unreleased cursor."""
        order = np.lexsort((-self._tomb_stamps, self._tomb_keys))
        keys, stamps = self._tomb_keys[order], self._tomb_stamps[order]
        first = np.ones(keys.size, dtype=np.bool_)
        first[1:] = keys[1:] != keys[:-1]
        keys, stamps = keys[first], stamps[first]
        dead = self._index.get(keys) < 0
        self._tomb_keys, self._tomb_stamps = keys[dead], stamps[dead]
        self._tomb_compacted = self._tomb_keys.size

    # -- change tracking ------------------------------------------------------------------

    @_locked
    def changes_since(self, cursor: int) -> TableChanges:
        """Current values of rows changed after `cursor`, and keys evicted after it that are
        not live now. Cursor 0 is a full export (no tombstones: it replaces the table)."""
        cut = self._clock
        self._clock += 1
        hw = self._index.high_water
        slots = np.flatnonzero(self._stamps[:hw] > cursor)
        tombstones = np.zeros(0, dtype=np.int64)
        if cursor > 0:
            tombstones = np.unique(self._tomb_keys[self._tomb_stamps > cursor])
            tombstones = tombstones[self._index.get(tombstones) < 0]
        return TableChanges(self._index.keys_of(slots), self._values[slots], tombstones, cut)

    @_locked
    def release(self, cursor: int) -> None:
        """Everything up to `cursor` is durably published: its tombstones are no longer needed."""
        keep = self._tomb_stamps > cursor
        self._tomb_keys, self._tomb_stamps = self._tomb_keys[keep], self._tomb_stamps[keep]
        self._tomb_compacted = min(self._tomb_compacted, self._tomb_keys.size)

    # -- state ----------------------------------------------------------------------------

    @_locked
    def export(self) -> tuple[np.ndarray, np.ndarray]:
        keys, slots = self._index.items()
        return keys, self._values[slots]

    @_locked
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume training and publishing, as plain numpy arrays."""
        keys, slots = self._index.items()
        state = {
            "dim": np.array(self.dim, dtype=np.int64),
            "keys": keys,
            "values": self._values[slots],
            "last_step": self._last_step[slots],
            "stamps": self._stamps[slots],
            "clock": np.array(self._clock, dtype=np.int64),
            "step": np.array(self._step, dtype=np.int64),
            "last_eviction": np.array(self._last_eviction, dtype=np.int64),
            "optimizer.step_count": np.array(self._optimizer.step_count, dtype=np.int64),
            "tombstones.keys": self._tomb_keys.copy(),
            "tombstones.stamps": self._tomb_stamps.copy(),
        }
        state.update({f"optimizer.{name}": array[slots] for name, array in self._state.items()})
        state.update({f"admission.{name}": array.copy() for name, array in self._admission.state_dict().items()})
        return state

    @_locked
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"state has dim {int(state['dim'])}, table {self.config.name!r} has {self.dim}")
        keys = np.asarray(state["keys"], dtype=np.int64)
        self._reset(max(self.config.initial_capacity, keys.size))
        slots = self._index.put(keys)
        self._fit_rows()
        self._values[slots] = state["values"]
        self._last_step[slots] = np.asarray(state["last_step"]).astype(np.uint32)
        self._stamps[slots] = state["stamps"]
        for name, array in self._state.items():
            array[slots] = state[f"optimizer.{name}"]
        self._clock = int(state["clock"])
        self._step = int(state["step"])
        self._last_eviction = int(state["last_eviction"])
        self._optimizer.step_count = int(state["optimizer.step_count"])
        self._tomb_keys = np.array(state["tombstones.keys"], dtype=np.int64)
        self._tomb_stamps = np.array(state["tombstones.stamps"], dtype=np.int64)
        prefix = "admission."
        self._admission.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    # -- incremental training state (resume from a snapshot plus deltas) ------------------

    @_locked
    def row_state(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Optimizer state and last-update step of live keys: with their values, a row's all."""
        slots = self._index.get(as_keys(keys))
        if (slots < 0).any():
            raise KeyError("row_state of keys that have no row")
        return {"last_step": self._last_step[slots], **{f"optimizer.{n}": a[slots] for n, a in self._state.items()}}

    @_locked
    def scalars(self) -> dict[str, np.ndarray]:
        return {"step": np.array(self._step, dtype=np.int64),
                "last_eviction": np.array(self._last_eviction, dtype=np.int64),
                "optimizer.step_count": np.array(self._optimizer.step_count, dtype=np.int64)}

    @_locked
    def apply_rows(self, keys: np.ndarray, values: np.ndarray, row_state: dict[str, np.ndarray],
                   tombstones: np.ndarray, scalars: dict[str, np.ndarray]) -> None:
        """Replays a training delta: tombstoned keys leave, then rows arrive with their whole
        state (as `row_state` gave it). Rows are stamped as changes of the open epoch."""
        self._lookup_cache = None
        gone = as_keys(tombstones)
        slots = self._index.get(gone)
        self._stamps[slots[slots >= 0]] = 0
        self._index.remove(gone[slots >= 0])
        keys = as_keys(keys)
        slots = self._index.put(keys)
        self._fit_rows()
        self._values[slots] = values
        self._last_step[slots] = row_state["last_step"]
        for name, array in self._state.items():
            array[slots] = row_state[f"optimizer.{name}"]
        self._stamps[slots] = self._clock
        self._step = int(scalars["step"])
        self._last_eviction = int(scalars["last_eviction"])
        self._optimizer.step_count = int(scalars["optimizer.step_count"])

    @_locked
    def mark(self) -> int:
        """A cursor at this instant: changes_since(mark()) later returns only what changed after."""
        cut = self._clock
        self._clock += 1
        return cut

    # -- memory ---------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes held, by part. `admission` pays for keys that have no row (yet), so it is
        not a per-row cost: its size follows the unadmitted tail (or the Bloom filter size)."""
        rows = [self._values, self._last_step, self._stamps, *self._state.values()]
        return {
            "rows": sum(a.nbytes for a in rows),
            "index": self._index.nbytes,
            "tombstones": self._tomb_keys.nbytes + self._tomb_stamps.nbytes,
            "admission": self._admission.nbytes,
        }

    @property
    def nbytes(self) -> int:
        return sum(self.memory().values())

    def ideal_bytes_per_row(self) -> int:
        """Key, values and optimizer state: the floor any table of these rows pays."""
        return _KEY_BYTES + 4 * self.dim + self._optimizer.bytes_per_row()
