"""A batch's unique ids, and pooling of their rows into per-example bags, with autograd.

The trainer looks up each table once per batch on its unique keys (`train_lookup`), then
pools. All tables' rows for a batch sit back to back in one flat buffer (`RowBuffer`), and
`pool_concat` pools every feature in one kernel pass over the examples, each example's
features in turn. Pooling feature by feature instead (one kernel per feature, writing a
column block of the [batch, sum of dims] output) wrote each output row 26 times at a
1.7 kB stride through lines long evicted: in the Criteo-shape benchmark its kernels took
5.7 ms of a ~21 ms step, this one's 2.6 ms (forward and backward). Done with torch
indexing, the backward of `rows[inverse]` is an index_put with accumulation, ~0.3 ms per
feature here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from trainer.embedding import kernels


@dataclass(frozen=True)
class Bags:
    """One sparse feature's bags over its table's rows, which start at float `start` of a
    flat row buffer and are `dim` wide. Bag b pools the rows indices[offsets[b]:offsets[b + 1]]
    (offsets are bag starts, as torch's embedding_bag takes them: the last bag ends at the
    last index; None: one id per bag), summed or averaged (`mean`; an empty bag pools to
    zeros, as embedding_bag does)."""

    start: int
    dim: int
    n_rows: int
    indices: np.ndarray
    offsets: np.ndarray | None = None
    mean: bool = False

    @property
    def n_bags(self) -> int:
        return self.indices.size if self.offsets is None else self.offsets.size


class _PoolConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: np.ndarray, ids: np.ndarray, offsets: np.ndarray, n_bags: int,
                rows: torch.Tensor) -> torch.Tensor:
        ctx.plan, ctx.ids, ctx.offsets, ctx.n_rows = plan, ids, offsets, rows.shape[0]
        out = np.empty((n_bags, int(plan[:, kernels.POOL_DIM].sum())), dtype=np.float32)
        kernels.pool_forward(rows.detach().numpy(), plan, ids, offsets, out)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows = np.empty(ctx.n_rows, dtype=np.float32)
        grad = np.ascontiguousarray(grad_out.numpy(), dtype=np.float32)
        kernels.pool_backward(grad, ctx.plan, ctx.ids, ctx.offsets, grad_rows)
        return None, None, None, None, torch.from_numpy(grad_rows)


def pool_concat(rows: torch.Tensor, bags: Sequence[Bags]) -> torch.Tensor:
    """torch.cat([pooled bags of each feature], dim=1) from the flat float32 row buffer
    `rows`, as one autograd node and one pass each way. Every feature needs the same number
    of bags (the batch size). The kernels check every index before following any."""
    if len({b.n_bags for b in bags}) != 1:
        raise ValueError("every feature needs the same number of bags")
    plan = np.empty((len(bags), kernels.POOL_PLAN_COLUMNS), dtype=np.int64)
    ids = np.concatenate([np.asarray(b.indices, dtype=np.int64).reshape(-1) for b in bags])
    multi = [np.asarray(b.offsets, dtype=np.int64) for b in bags if b.offsets is not None]
    offsets = np.concatenate(multi) if multi else np.zeros(0, dtype=np.int64)
    col = first = bounds = 0
    for f, b in enumerate(bags):
        plan[f] = (b.start, b.n_rows, b.dim, col, first, b.indices.size, -1 if b.offsets is None else bounds, b.mean)
        col += b.dim
        first += b.indices.size
        bounds += 0 if b.offsets is None else b.offsets.size
    return pool_planned(rows, plan, ids, offsets, bags[0].n_bags)


def pool_planned(rows: torch.Tensor, plan: np.ndarray, ids: np.ndarray, offsets: np.ndarray,
                 n_bags: int) -> torch.Tensor:
    """pool_concat of features laid out in one plan (`kernels.POOL_PLAN_COLUMNS` per feature:
    where its rows start, how many, their width, its first output column, its first id and
    how many, where its bag starts begin in `offsets` or -1, whether it averages): the
    training step builds the plan from a flat batch in a few array operations."""
    if rows.dim() != 1 or rows.dtype != torch.float32 or not rows.is_contiguous():
        raise ValueError("rows must be a flat, contiguous float32 buffer")
    return _PoolConcat.apply(plan, ids, offsets, n_bags, rows)


class RowBuffer:
    """One batch's rows of several tables, back to back in one flat float32 tensor (a leaf
    of autograd): `train_lookup(..., out=buffer.rows(t))` fills table t's part, `bags`
    describes a feature over it for `pool_concat`, and after backward `grad(t)` is table
    t's gradient for apply_gradients, a view of the buffer's one gradient (no copies)."""

    def __init__(self, shapes: Sequence[tuple[int, int]]) -> None:
        """shapes: (rows, dim) of each table's part."""
        self._shapes = [(int(n), int(d)) for n, d in shapes]
        self._starts = np.zeros(len(self._shapes) + 1, dtype=np.int64)
        np.cumsum([n * d for n, d in self._shapes], out=self._starts[1:])
        self.values = torch.empty(int(self._starts[-1]), dtype=torch.float32, requires_grad=True)
        self._flat = self.values.detach().numpy()

    @property
    def starts(self) -> np.ndarray:
        """Where each table's part starts in `values` (and, last, its size)."""
        return self._starts

    def rows(self, t: int) -> np.ndarray:
        n, d = self._shapes[t]
        return self._flat[self._starts[t]:self._starts[t + 1]].reshape(n, d)

    def bags(self, t: int, indices: np.ndarray, offsets: np.ndarray | None = None, mean: bool = False) -> Bags:
        """Bags of a feature of table t: indices into t's rows, offsets as in `Bags`."""
        n, d = self._shapes[t]
        return Bags(int(self._starts[t]), d, n, indices, offsets, mean)

    def grad(self, t: int) -> torch.Tensor | None:
        if self.values.grad is None:
            return None
        n, d = self._shapes[t]
        return self.values.grad[self._starts[t]:self._starts[t + 1]].view(n, d)


def bag_sum(rows: torch.Tensor, inverse: np.ndarray, offsets: np.ndarray | None = None) -> torch.Tensor:
    """Pools rows [n_unique, dim] into bags [n_bags, dim]: bag b sums rows[inverse[i]] for i
    from offsets[b] (a bag start, as embedding_bag takes it) to the next bag's start, the last
    bag to the last id. Without offsets each bag is one id (a single-valued feature).
    `inverse` is np.unique's return_inverse over the batch's ids."""
    n, dim = rows.shape
    bags = Bags(0, dim, n, np.ascontiguousarray(inverse, dtype=np.int64).reshape(-1), offsets)
    return pool_concat(rows.contiguous().reshape(-1), [bags])


def unique_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(ids, return_inverse=True, return_counts=True) in one hashing pass instead
    of a sort (~5x faster on a 2048-id feature here); keys come in first-seen order, which
    train_lookup does not mind."""
    return unique_columns(np.asarray(ids, dtype=np.int64).reshape(-1, 1))[0]


def unique_columns(ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """unique_ids of each column of ids [n, columns] (one single-valued feature a column),
    in one kernel call: per call, not per id, was most of unique_ids' cost at batch 2048."""
    ids = np.asarray(ids, dtype=np.int64)
    n, n_cols = ids.shape
    by_column = np.ascontiguousarray(ids.T).reshape(-1)
    return unique_segments(by_column, np.arange(n_cols + 1, dtype=np.int64) * n)


def unique_segments(ids: np.ndarray, bounds: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """unique_ids of each segment ids[bounds[s]:bounds[s + 1]] (e.g. one table's ids), in one
    kernel call."""
    keys, counts, starts, inverse = kernels.unique_segments(ids, bounds)
    return [(keys[a:b], inverse[lo:hi], counts[a:b])
            for a, b, lo, hi in zip(starts[:-1], starts[1:], bounds[:-1], bounds[1:])]
