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
from trainer.embedding.prefetch import AHEAD, prefetch, prefetch_end


@njit(cache=True, inline="always")
def prefetch_row(slots: np.ndarray, k: np.int64, values: np.ndarray, state: np.ndarray, last_step: np.ndarray,
                 stamps: np.ndarray) -> None:
    """Requests every line an update of row slots[k] touches (nothing past the batch's end
    or for an unadmitted key). Update loops call it for the row AHEAD of the one they work on."""
    if k < slots.size:
        s = slots[k]
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
def fill_rows(array: np.ndarray, slots: np.ndarray, value: float) -> None:
    """array[slots] = value, for the optimizer state of new rows: numpy's fancy assignment
    costs more in setup than the few dozen rows a table creates per step."""
    for s in slots:
        array[s] = value


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
    for i in range(slots.size):
        prefetch_row(slots, i + AHEAD, values, values, last_step, stamps)
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
    for i in range(slots.size):
        prefetch_row(slots, i + AHEAD, values, accum, last_step, stamps)
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
    dim = values.shape[1]
    for i in range(slots.size):
        prefetch_row(slots, i + AHEAD, values, accum, last_step, stamps)
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
    target = step // decay_step
    for i in range(slots.size):
        prefetch_row(slots, i + AHEAD, values, accum, last_step, stamps)
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
    one = np.float32(1.0)
    for i in range(slots.size):
        prefetch_row(slots, i + AHEAD, values, m, last_step, stamps)
        prefetch_row(slots, i + AHEAD, v, v, last_step, stamps)
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


# Columns of the pooling kernels' plan, one row per feature: where its table's rows start in
# the flat row buffer, how many rows and how wide, its first output column, where its ids
# start in `ids` and how many, where its bag bounds start in `offsets` (-1: one id per
# bag), mean (1) or sum (0).
POOL_START, POOL_ROWS, POOL_DIM, POOL_COL, POOL_FIRST, POOL_IDS, POOL_BOUNDS, POOL_MEAN = range(8)
POOL_PLAN_COLUMNS = 8
# Examples pooled together, feature by feature: their output lines (64 x 26 x 64 B at Criteo
# shape) stay in L2 while each feature writes its columns, and each feature's plan entries
# stay in registers for the block.
_POOL_BLOCK = 64


@njit(cache=True)
def _check_pool(rows: np.ndarray, plan: np.ndarray, ids: np.ndarray, offsets: np.ndarray, n_bags: np.int64,
                width: np.int64) -> None:
    """Every index the pooling kernels will follow is in range (they then skip the checks)."""
    for f in range(plan.shape[0]):
        start, n_rows, dim, col = plan[f, POOL_START], plan[f, POOL_ROWS], plan[f, POOL_DIM], plan[f, POOL_COL]
        first, n_ids, bounds = plan[f, POOL_FIRST], plan[f, POOL_IDS], plan[f, POOL_BOUNDS]
        if start < 0 or n_rows < 0 or dim < 1 or start + n_rows * dim > rows.size or col < 0 or col + dim > width:
            raise IndexError("a feature's rows or columns are out of range")
        if first < 0 or n_ids < 0 or first + n_ids > ids.size:
            raise IndexError("a feature's ids are out of range")
        for i in range(first, first + n_ids):
            if not (0 <= ids[i] < n_rows):
                raise IndexError("row index out of range")
        if bounds < 0:
            if n_ids != n_bags:
                raise IndexError("a single-valued feature needs one id per bag")
            continue
        if bounds + n_bags > offsets.size:
            raise IndexError("bag offsets out of range")
        if n_bags and (offsets[bounds] < 0 or offsets[bounds + n_bags - 1] > n_ids):
            raise IndexError("bag offsets out of range")
        for b in range(bounds, bounds + n_bags - 1):
            if offsets[b] > offsets[b + 1]:
                raise IndexError("bag offsets decrease")


@njit(cache=True, inline="always")
def _bag(plan: np.ndarray, f: np.int64, offsets: np.ndarray, b: np.int64,
         n_bags: np.int64) -> tuple[np.int64, np.int64]:
    """Positions [lo, hi) in `ids` of feature f's bag b: it ends where the next bag starts,
    the last one at the feature's last id."""
    first, bounds = plan[f, POOL_FIRST], plan[f, POOL_BOUNDS]
    if bounds < 0:
        return first + b, first + b + 1
    end = offsets[bounds + b + 1] if b + 1 < n_bags else plan[f, POOL_IDS]
    return first + offsets[bounds + b], first + end


@njit(cache=True, inline="always")
def _row_into(dst: np.ndarray, d: np.int64, src: np.ndarray, s: np.int64, dim: np.int64, add: bool) -> None:
    """dst[d:d + dim] = (add: +=) src[s:s + dim]. Width 16 has its own loops: LLVM unrolls a
    constant trip count into vector moves, and at Criteo shape that made pooling twice as
    fast as the loop over a run-time width (measured)."""
    if dim == 16:
        if add:
            for j in range(16):
                dst[d + j] += src[s + j]
        else:
            for j in range(16):
                dst[d + j] = src[s + j]
    elif add:
        for j in range(dim):
            dst[d + j] += src[s + j]
    else:
        for j in range(dim):
            dst[d + j] = src[s + j]


@njit(cache=True)
def pool_forward(rows: np.ndarray, plan: np.ndarray, ids: np.ndarray, offsets: np.ndarray,
                 out: np.ndarray) -> None:
    """out[b, col_f:col_f + dim_f] = sum (or mean) of feature f's rows in bag b. Blocks of
    examples, each feature in turn: the output is written once, in cache, and the random
    reads are of the batch's rows, which the lookups have just written."""
    n_bags, width = out.shape
    _check_pool(rows, plan, ids, offsets, n_bags, width)
    flat = out.reshape(-1)
    for b0 in range(0, n_bags, _POOL_BLOCK):
        for f in range(plan.shape[0]):
            start, dim, col, mean = plan[f, POOL_START], plan[f, POOL_DIM], plan[f, POOL_COL], plan[f, POOL_MEAN]
            for b in range(b0, min(b0 + _POOL_BLOCK, n_bags)):
                lo, hi = _bag(plan, f, offsets, b, n_bags)
                d = b * width + col
                if lo == hi:
                    flat[d:d + dim] = 0.0
                    continue
                _row_into(flat, d, rows, start + ids[lo] * dim, dim, False)
                for i in range(lo + 1, hi):
                    _row_into(flat, d, rows, start + ids[i] * dim, dim, True)
                if mean and hi - lo > 1:
                    for j in range(dim):
                        flat[d + j] /= np.float32(hi - lo)


@njit(cache=True)
def pool_backward(grad_out: np.ndarray, plan: np.ndarray, ids: np.ndarray, offsets: np.ndarray,
                  grad_rows: np.ndarray) -> None:
    """The transpose of pool_forward: each row collects the gradients of the bags it is in.
    It checks the indices again (one pass over them): the ids may be a view of a batch that
    another process wrote, and a change between the passes must raise, not write out of bounds."""
    n_bags, width = grad_out.shape
    _check_pool(grad_rows, plan, ids, offsets, n_bags, width)
    grad_rows[:] = 0.0
    flat = grad_out.reshape(-1)
    for b0 in range(0, n_bags, _POOL_BLOCK):
        for f in range(plan.shape[0]):
            start, dim, col, mean = plan[f, POOL_START], plan[f, POOL_DIM], plan[f, POOL_COL], plan[f, POOL_MEAN]
            for b in range(b0, min(b0 + _POOL_BLOCK, n_bags)):
                lo, hi = _bag(plan, f, offsets, b, n_bags)
                d = b * width + col
                for i in range(lo, hi):
                    r = start + ids[i] * dim
                    if mean:
                        for j in range(dim):
                            grad_rows[r + j] += flat[d + j] / np.float32(hi - lo)
                    else:
                        _row_into(grad_rows, r, flat, d, dim, True)


@njit(cache=True)
def unique_segments(ids: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ids of each segment ids[bounds[s]:bounds[s + 1]], through one throwaway
    hash table reset per segment: (keys, counts, starts, inverse). Segment s's keys (in
    first-seen order) and their counts are keys[starts[s]:starts[s + 1]] and counts[...];
    inverse[i] is the position of ids[i] among its segment's keys."""
    n_segments = len(bounds) - 1
    longest = 0
    for s in range(n_segments):
        longest = max(longest, bounds[s + 1] - bounds[s])
    size = 16
    while size < 2 * longest:
        size *= 2
    mask = np.uint64(size - 1)
    table = np.empty(size, dtype=np.int64)
    keys = np.empty(len(ids), dtype=np.int64)
    counts = np.zeros(len(ids), dtype=np.int64)
    starts = np.zeros(n_segments + 1, dtype=np.int64)
    inverse = np.empty(len(ids), dtype=np.int64)
    m = 0
    for s in range(n_segments):
        table[:] = -1
        first = m
        for i in range(bounds[s], bounds[s + 1]):
            key = ids[i]
            pos = hash64(key) & mask
            while True:
                u = table[pos]
                if u < 0:
                    table[pos] = m
                    keys[m] = key
                    u = m
                    m += 1
                if keys[u] == key:
                    counts[u] += 1
                    inverse[i] = u - first
                    break
                pos = (pos + np.uint64(1)) & mask
        starts[s + 1] = m
    return keys[:m], counts[:m], starts, inverse
