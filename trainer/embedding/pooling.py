"""A batch's unique ids, and sum-pooling of their rows into per-example bags, with autograd.

The trainer looks up each table once per batch on its unique keys (`train_lookup`), then
pools. Done with torch indexing, the backward of `rows[inverse]` is an index_put with
accumulation, ~0.3 ms per feature on this machine: for 26 features it cost more than the
whole table update. These kernels are one pass each way.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.embedding import kernels


class _BagSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, inverse: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
        ctx.inverse, ctx.offsets, ctx.n_rows = inverse, offsets, rows.shape[0]
        out = np.empty((offsets.size - 1, rows.shape[1]), dtype=np.float32)
        kernels.bag_sum_forward(rows.detach().numpy(), inverse, offsets, out)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad_rows = np.empty((ctx.n_rows, grad_out.shape[1]), dtype=np.float32)
        grad = np.ascontiguousarray(grad_out.numpy(), dtype=np.float32)
        kernels.bag_sum_backward(grad, ctx.inverse, ctx.offsets, grad_rows)
        return torch.from_numpy(grad_rows), None, None


class _BagSumConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, bags: list[tuple[np.ndarray, np.ndarray]], *rows: torch.Tensor) -> torch.Tensor:
        ctx.bags, ctx.shapes = bags, [r.shape for r in rows]
        out = np.empty((bags[0][1].size - 1, sum(r.shape[1] for r in rows)), dtype=np.float32)
        col = 0
        for (inverse, offsets), r in zip(bags, rows):
            kernels.bag_sum_forward(r.detach().numpy(), inverse, offsets, out[:, col:col + r.shape[1]])
            col += r.shape[1]
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = np.ascontiguousarray(grad_out.numpy(), dtype=np.float32)
        grads, col = [], 0
        for (inverse, offsets), shape in zip(ctx.bags, ctx.shapes):
            grad_rows = np.empty(tuple(shape), dtype=np.float32)
            kernels.bag_sum_backward(grad[:, col:col + shape[1]], inverse, offsets, grad_rows)
            grads.append(torch.from_numpy(grad_rows))
            col += shape[1]
        return (None, *grads)


def bag_sum(rows: torch.Tensor, inverse: np.ndarray, offsets: np.ndarray | None = None) -> torch.Tensor:
    """Pools rows [n_unique, dim] into bags [n_bags, dim]: bag b sums rows[inverse[i]] for i in
    [offsets[b], offsets[b + 1]). Without offsets each bag is one id (a single-valued
    feature). `inverse` is np.unique's return_inverse over the batch's ids."""
    inverse = np.ascontiguousarray(inverse, dtype=np.int64).reshape(-1)
    if offsets is None:
        offsets = np.arange(inverse.size + 1, dtype=np.int64)
    return _BagSum.apply(rows, inverse, np.ascontiguousarray(offsets, dtype=np.int64))


def unique_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(ids, return_inverse=True, return_counts=True) in one hashing pass instead
    of a sort (~5x faster on a 2048-id feature here); keys come in first-seen order, which
    train_lookup does not mind."""
    return kernels.unique(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1))


def bag_sum_concat(rows: list[torch.Tensor], inverses: list[np.ndarray],
                   offsets: list[np.ndarray | None] | None = None) -> torch.Tensor:
    """torch.cat([bag_sum(r, i, o) ...], dim=1) as one autograd node, written in place: with
    26 features, the per-feature nodes, the cat and its backward slices cost more than the
    pooling itself. All features must have the same number of bags (the batch size)."""
    offsets = offsets or [None] * len(rows)
    bags = []
    for inverse, off in zip(inverses, offsets):
        inverse = np.ascontiguousarray(inverse, dtype=np.int64).reshape(-1)
        off = np.arange(inverse.size + 1, dtype=np.int64) if off is None else np.ascontiguousarray(off, np.int64)
        bags.append((inverse, off))
    if len({off.size for _, off in bags}) != 1:
        raise ValueError("every feature needs the same number of bags")
    return _BagSumConcat.apply(bags, *rows)
