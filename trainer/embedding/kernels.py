"""Row kernels of an Embedding Variable: initialisation, gather, sparse optimizer updates.

Each update walks the batch's rows once, in place, with the optimizer state next to the
row: the per-row work PyTorch spreads over a dozen tensor ops (and allocations) is one loop
here. Slots < 0 (unadmitted keys) are skipped. Arithmetic is float32 in the order torch's
optimizers use, so results match `torch.optim` to float32 rounding.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from trainer.embedding.keyindex import hash64
from trainer.embedding.prefetch import prefetch, prefetch_end


@njit(cache=True, inline="always")
def prefetch_rows(slots: np.ndarray, values: np.ndarray, state: np.ndarray, last_step: np.ndarray,
                  stamps: np.ndarray) -> None:
    """Requests every line an update of rows `slots` touches before touching any."""
    for i in range(slots.size):
        s = slots[i]
        if s >= 0:
            prefetch(values, s)
            prefetch_end(values, s)
            prefetch(state, s)
            prefetch_end(state, s)
            prefetch(last_step, s)
            prefetch(stamps, s)

_TWO_PI = np.float32(2.0 * np.pi)
_INV_2_24 = np.float32(1.0 / 16777216.0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S40 = np.uint64(40)


@njit(cache=True, inline="always")
def _uniform(seed_hash: np.uint64, key: np.int64, j: np.int64) -> np.float32:
    """Uniform in (0, 1] on a 2^-24 grid, a pure function of (seed, key, j): counter-based,
    no state. float32 throughout: the transcendentals dominate row creation."""
    x = hash64(np.int64(hash64(key) ^ seed_hash) + j * np.int64(_GOLDEN))
    return (np.float32(x >> _S40) + np.float32(1.0)) * _INV_2_24


@njit(cache=True)
def init_rows(keys: np.ndarray, rows: np.ndarray, seed: np.int64, std: np.float32, out: np.ndarray) -> None:
    """N(0, std^2) by Box-Muller from (seed, key): a key's first row is the same in every run
    and on every trainer, whatever order keys arrive in. Each pair of uniforms gives two
    normals (cos and sin): row creation is a hot path under id churn. Key i's row is
    written to out[rows[i]], straight into the table."""
    seed_hash = hash64(seed)
    for i in range(keys.size):
        init_row(seed_hash, keys[i], std, out, rows[i])


@njit(cache=True, inline="always")
def init_row(seed_hash: np.uint64, key: np.int64, std: np.float32, out: np.ndarray, r: np.int64) -> None:
    dim = out.shape[1]
    for j in range(0, dim, 2):
        radius = std * np.sqrt(np.float32(-2.0) * np.log(_uniform(seed_hash, key, j)))
        angle = _TWO_PI * _uniform(seed_hash, key, j + 1)
        out[r, j] = radius * np.cos(angle)
        if j + 1 < dim:
            out[r, j + 1] = radius * np.sin(angle)


@njit(cache=True)
def gather(values: np.ndarray, slots: np.ndarray, default: np.float32, out: np.ndarray) -> None:
    dim = values.shape[1]
    for i in range(slots.size):
        s = slots[i]
        if s < 0:
            for j in range(dim):
                out[i, j] = default
        else:
            for j in range(dim):
                out[i, j] = values[s, j]


@njit(cache=True)
def gather_sum(values: np.ndarray, slots: np.ndarray, offsets: np.ndarray,
               default: np.float32, out: np.ndarray) -> None:
    """Sum-pools bags: bag b is slots[offsets[b]:offsets[b + 1]]."""
    dim = values.shape[1]
    for b in range(offsets.size - 1):
        for j in range(dim):
            out[b, j] = 0.0
        for i in range(offsets[b], offsets[b + 1]):
            s = slots[i]
            for j in range(dim):
                out[b, j] += default if s < 0 else values[s, j]


@njit(cache=True)
def touch(slots: np.ndarray, step: np.int64, stamp: np.int64,
          last_step: np.ndarray, stamps: np.ndarray) -> None:
    """Records an update: for steps_to_live eviction and for the publisher's change cut.
    last_step keeps step mod 2^32 (4 bytes a row): see elapsed_steps."""
    low = np.uint32(step & 0xFFFFFFFF)
    for s in slots:
        if s >= 0:
            last_step[s] = low
            stamps[s] = stamp


@njit(cache=True, inline="always")
def elapsed_steps(step: np.int64, last: np.uint32) -> np.int64:
    """Steps since `last` (a step mod 2^32); exact while fewer than 2^32 steps have passed,
    and eviction removes idle rows long before that."""
    return (step - np.int64(last)) & np.int64(0xFFFFFFFF)


@njit(cache=True)
def sgd(slots: np.ndarray, grads: np.ndarray, values: np.ndarray, lr: np.float32,
        last_step: np.ndarray, stamps: np.ndarray, step_low: np.uint32, stamp: np.int64) -> None:
    prefetch_rows(slots, values, values, last_step, stamps)
    for i in range(slots.size):
        s = slots[i]
        if s >= 0:
            last_step[s] = step_low
            stamps[s] = stamp
            for j in range(values.shape[1]):
                values[s, j] -= lr * grads[i, j]


@njit(cache=True)
def adagrad(slots: np.ndarray, grads: np.ndarray, values: np.ndarray, accum: np.ndarray,
            lr: np.float32, eps: np.float32,
            last_step: np.ndarray, stamps: np.ndarray, step_low: np.uint32, stamp: np.int64) -> None:
    """torch.optim.Adagrad: sum += g^2; w -= lr * g / (sqrt(sum) + eps)."""
    prefetch_rows(slots, values, accum, last_step, stamps)
    for i in range(slots.size):
        s = slots[i]
        if s >= 0:
            last_step[s] = step_low
            stamps[s] = stamp
            for j in range(values.shape[1]):
                g = grads[i, j]
                a = accum[s, j] + g * g
                accum[s, j] = a
                values[s, j] -= lr * (g / (np.sqrt(a) + eps))


@njit(cache=True)
def rowwise_adagrad(slots: np.ndarray, grads: np.ndarray, values: np.ndarray, accum: np.ndarray,
                    lr: np.float32, eps: np.float32,
                    last_step: np.ndarray, stamps: np.ndarray, step_low: np.uint32, stamp: np.int64) -> None:
    """FBGEMM's exact row-wise Adagrad: one accumulator per row, fed the mean of g^2."""
    prefetch_rows(slots, values, accum, last_step, stamps)
    dim = values.shape[1]
    for i in range(slots.size):
        s = slots[i]
        if s >= 0:
            last_step[s] = step_low
            stamps[s] = stamp
            sq = np.float32(0.0)
            for j in range(dim):
                sq += grads[i, j] * grads[i, j]
            a = accum[s] + sq / np.float32(dim)
            accum[s] = a
            mult = lr / (np.sqrt(a) + eps)
            for j in range(dim):
                values[s, j] -= mult * grads[i, j]


@njit(cache=True)
def adagrad_decay(slots: np.ndarray, grads: np.ndarray, values: np.ndarray, accum: np.ndarray,
                  power: np.ndarray, step: np.int64, lr: np.float32, eps: np.float32,
                  decay_rate: np.float32, decay_step: np.int64, baseline: np.float32,
                  last_step: np.ndarray, stamps: np.ndarray, step_low: np.uint32, stamp: np.int64) -> None:
    """DeepRec's AdagradDecay (KvSparseApplyAdagradDecay): while step // decay_step is ahead
    of the row's decay count, each update of the row first decays its accumulator once
    (times decay_rate, floored at baseline), so old evidence fades and a long-lived row
    keeps learning. eps (DeepRec has none) only guards an all-zero accumulator."""
    prefetch_rows(slots, values, accum, last_step, stamps)
    target = step // decay_step
    for i in range(slots.size):
        s = slots[i]
        if s < 0:
            continue
        last_step[s] = step_low
        stamps[s] = stamp
        if target > power[s]:
            power[s] += 1
            for j in range(values.shape[1]):
                accum[s, j] = max(accum[s, j] * decay_rate, baseline)
        for j in range(values.shape[1]):
            g = grads[i, j]
            a = accum[s, j] + g * g
            accum[s, j] = a
            values[s, j] -= lr * (g / (np.sqrt(a) + eps))


@njit(cache=True)
def lazy_adam(slots: np.ndarray, grads: np.ndarray, values: np.ndarray, m: np.ndarray,
              v: np.ndarray, beta1: np.float32, beta2: np.float32, step_size: np.float32,
              eps: np.float32,
              last_step: np.ndarray, stamps: np.ndarray, step_low: np.uint32, stamp: np.int64) -> None:
    """torch.optim.SparseAdam: moments of the rows in the batch only; the bias correction
    (in step_size) uses the table's global step count, as torch, TF and DeepRec do."""
    prefetch_rows(slots, values, m, last_step, stamps)
    prefetch_rows(slots, v, v, last_step, stamps)
    one = np.float32(1.0)
    for i in range(slots.size):
        s = slots[i]
        if s >= 0:
            last_step[s] = step_low
            stamps[s] = stamp
            for j in range(values.shape[1]):
                g = grads[i, j]
                mj = m[s, j] + (g - m[s, j]) * (one - beta1)
                vj = v[s, j] + (g * g - v[s, j]) * (one - beta2)
                m[s, j] = mj
                v[s, j] = vj
                values[s, j] += -step_size * (mj / (np.sqrt(vj) + eps))


@njit(cache=True)
def bag_sum_forward(rows: np.ndarray, inverse: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """out[b] = sum of rows[inverse[i]] for i in bag b = [offsets[b], offsets[b + 1])."""
    for b in range(offsets.size - 1):
        for j in range(rows.shape[1]):
            out[b, j] = 0.0
        for i in range(offsets[b], offsets[b + 1]):
            r = inverse[i]
            for j in range(rows.shape[1]):
                out[b, j] += rows[r, j]


@njit(cache=True)
def bag_sum_backward(grad_out: np.ndarray, inverse: np.ndarray, offsets: np.ndarray,
                     grad_rows: np.ndarray) -> None:
    """The transpose of bag_sum_forward: each row collects the gradients of its bags."""
    grad_rows[:] = 0.0
    for b in range(offsets.size - 1):
        for i in range(offsets[b], offsets[b + 1]):
            r = inverse[i]
            for j in range(grad_rows.shape[1]):
                grad_rows[r, j] += grad_out[b, j]


@njit(cache=True)
def unique(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys in first-seen order, inverse, counts) through a throwaway hash table."""
    n = ids.size
    size = 16
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    table = np.full(size, -1, dtype=np.int64)
    keys = np.empty(n, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int64)
    m = 0
    for i in range(n):
        pos = hash64(ids[i]) & mask
        while True:
            u = table[pos]
            if u < 0:
                table[pos] = m
                keys[m] = ids[i]
                u = m
                m += 1
            if keys[u] == ids[i]:
                counts[u] += 1
                inverse[i] = u
                break
            pos = (pos + np.uint64(1)) & mask
    return keys[:m].copy(), inverse, counts[:m].copy()
