"""Dense networks that read dense features and pooled embeddings and return a logit.

Every model has the same interface, `forward(dense [B, n_dense], pooled [[B, dim_f]]) ->
logits [B]`, so the sparse part (Embedding Variables), publishing and serving are the same
for all of them. Sparse rows are not in these modules: they live in Embedding Variables;
the dense parameters here are trained with torch.optim and published as named tensors.

Serving a ranking request scores many candidates under one context: most inputs are the same
for every row. `forward_shared` (DLRM, DeepFM, Wide & Deep) takes such inputs as one row
([1, width], shared by all rows) beside per-row ones ([B, width]) and computes what depends
only on them once: a first linear layer is split into its shared and per-row columns, and
DLRM's dot products between shared vectors are taken once. It equals `forward` on the
inputs expanded to B rows, up to float rounding (tests/test_models.py).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stream.schema import FeatureSchema
from trainer.config import TrainerConfig


def mlp(sizes: list[int], last_activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ProjectTo(nn.Module):
    """Brings every feature's embedding to one dimension, for models that take dot products
    between them; schemas with mixed table dimensions then work unchanged."""

    def __init__(self, embedding_dims: list[int], dim: int) -> None:
        super().__init__()
        self.projections = nn.ModuleList(
            nn.Identity() if d == dim else nn.Linear(d, dim, bias=False) for d in embedding_dims
        )
        # The common case: every table already has `dim`. Stacking directly skips 26 calls of
        # an Identity module: 66 -> 13 µs of a 100-candidate request's ~400 µs forward.
        self.identity = all(d == dim for d in embedding_dims)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        if self.identity:
            return torch.stack(pooled, dim=1)  # [B, F, dim]
        return torch.stack(self.each(pooled), dim=1)

    def each(self, pooled: list[torch.Tensor]) -> list[torch.Tensor]:
        """The projected embeddings one by one (they may differ in rows: 1 when shared)."""
        return pooled if self.identity else [p(e) for p, e in zip(self.projections, pooled)]


def is_shared(t: torch.Tensor) -> bool:
    """One row standing for every row of the batch (`forward_shared`'s convention)."""
    return t.shape[0] == 1


@functools.lru_cache(maxsize=256)
def _column_split(widths: tuple[int, ...], shared: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of the shared parts and of the per-row parts of concatenated parts."""
    bounds = list(itertools.accumulate(widths, initial=0))
    cols: dict[bool, list[int]] = {True: [], False: []}
    for (start, end), one in zip(itertools.pairwise(bounds), shared):
        cols[one].extend(range(start, end))
    return torch.tensor(cols[True], dtype=torch.int64), torch.tensor(cols[False], dtype=torch.int64)


class SplitInput(NamedTuple):
    """`torch.cat(parts, 1)` for parts of 1 (shared) or B rows, kept as its shared columns
    (one row) and its per-row columns, with where each sits in the concatenation."""

    once: torch.Tensor  # [1, shared width]
    per_row: torch.Tensor  # [B, per-row width]
    once_cols: torch.Tensor
    per_row_cols: torch.Tensor

    @classmethod
    def of(cls, parts: Sequence[torch.Tensor]) -> "SplitInput":
        """At least one part shared and one not."""
        shared = tuple(is_shared(p) for p in parts)
        once_cols, per_row_cols = _column_split(tuple(p.shape[1] for p in parts), shared)
        return cls(torch.cat([p for p, one in zip(parts, shared) if one], 1),
                   torch.cat([p for p, one in zip(parts, shared) if not one], 1), once_cols, per_row_cols)

    def linear(self, layer: nn.Linear) -> torch.Tensor:
        """`layer` on the concatenation: the shared columns multiplied once, the per-row
        ones once per row. [B, out]"""
        once = F.linear(self.once, layer.weight.index_select(1, self.once_cols), layer.bias)
        return F.linear(self.per_row, layer.weight.index_select(1, self.per_row_cols)) + once


def _after_first(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The layers of an MLP after its first linear layer."""
    for layer in itertools.islice(layers, 1, None):
        x = layer(x)
    return x


class DLRM(nn.Module):
    """DLRM (Naumov et al., 2019): bottom MLP on dense features, pairwise dot products
    between it and every pooled embedding, top MLP on those interactions."""

    def __init__(self, n_dense: int, embedding_dims: list[int], bottom: list[int], top: list[int]) -> None:
        super().__init__()
        d = bottom[-1]
        self.bottom = mlp([n_dense, *bottom])
        self.project = ProjectTo(embedding_dims, d)
        n_vectors = len(embedding_dims) + 1
        rows, cols = torch.triu_indices(n_vectors, n_vectors, offset=1)
        # Each pair's position in the flattened [n_vectors, n_vectors] dot-product matrix.
        # One index_select on it costs half of indexing with (rows, cols), and its backward
        # (index_add) a third of that indexing's index_put: 6.1-7.5 -> 3.3-4.1 ms forward
        # and backward at batch 512 (one thread), 0.46 -> 0.23 ms a 100-candidate request.
        self.register_buffer("pairs", rows * n_vectors + cols, persistent=False)
        self.top = mlp([d + len(rows), *top, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense)
        vectors = torch.cat([x.unsqueeze(1), self.project(pooled)], dim=1)
        return self.top(torch.cat([x, self.interactions(vectors)], dim=1)).squeeze(1)

    def interactions(self, vectors: torch.Tensor) -> torch.Tensor:
        """[B, n, d] -> [B, n (n - 1) / 2]: <v_i, v_j> for every pair i < j, in row-major order."""
        return torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1).index_select(1, self.pairs)

    def forward_shared(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        """`forward` where inputs of one row are shared by every row: the dot products among
        shared vectors, and their share of the top MLP's first layer, are computed once.
        At least one input is shared and one is not (`serving.model` sends only such)."""
        x = self.bottom(dense)
        vectors = [x, *self.project.each(pooled)]
        d = x.shape[1]
        plan = _dlrm_plan(tuple(is_shared(v) for v in vectors), d)
        once = torch.cat([vectors[i] for i in plan.shared])  # [S, d]
        rows = torch.stack([vectors[i] for i in plan.rows], 1)  # [B, R, d]
        shared_dots = (once @ once.T).flatten().index_select(0, plan.shared_dots)
        row_dots = torch.cat([torch.matmul(rows, once.T).flatten(1),  # row x shared pairs
                              torch.bmm(rows, rows.transpose(1, 2)).flatten(1)], 1).index_select(1, plan.row_dots)
        shared_in = torch.cat([x, shared_dots[None]], 1) if plan.x_shared else shared_dots[None]
        rows_in = row_dots if plan.x_shared else torch.cat([x, row_dots], 1)
        first = self.top[0]
        h = F.linear(rows_in, first.weight.index_select(1, plan.row_cols)) + F.linear(
            shared_in, first.weight.index_select(1, plan.shared_cols), first.bias)
        return _after_first(self.top, h).squeeze(1)


class _DLRMPlan:
    """Where each pair's dot product comes from when some vectors are shared: from the Gram
    matrix of the shared vectors, or per row from [row x shared, row x row] products; and
    which columns of the top MLP's input (x's d, then one per pair) they and x are."""

    def __init__(self, shared: tuple[bool, ...], d: int) -> None:
        self.x_shared = shared[0]
        self.shared = [i for i, one in enumerate(shared) if one]
        self.rows = [i for i, one in enumerate(shared) if not one]
        at_s = {v: k for k, v in enumerate(self.shared)}
        at_r = {v: k for k, v in enumerate(self.rows)}
        n_s, n_r = len(self.shared), len(self.rows)
        shared_dots, row_dots = [], []
        x_cols = list(range(d))
        shared_cols, row_cols = (x_cols, []) if self.x_shared else ([], x_cols)
        pairs = [(i, j) for i in range(len(shared)) for j in range(i + 1, len(shared))]
        for p, (i, j) in enumerate(pairs):
            if shared[i] and shared[j]:
                shared_dots.append(at_s[i] * n_s + at_s[j])
                shared_cols.append(d + p)
                continue
            if shared[i] or shared[j]:
                r, s_ = (at_r[j], at_s[i]) if shared[i] else (at_r[i], at_s[j])
                row_dots.append(r * n_s + s_)
            else:
                row_dots.append(n_r * n_s + at_r[i] * n_r + at_r[j])
            row_cols.append(d + p)
        self.shared_dots, self.row_dots, self.shared_cols, self.row_cols = (
            torch.tensor(v, dtype=torch.int64) for v in (shared_dots, row_dots, shared_cols, row_cols))


@functools.lru_cache(maxsize=256)
def _dlrm_plan(shared: tuple[bool, ...], d: int) -> _DLRMPlan:
    return _DLRMPlan(shared, d)


class WideAndDeep(nn.Module):
    """Wide & Deep (Cheng et al., 2016): a linear model beside an MLP, summed as logits.

    The wide part is linear in the dense features and the pooled embeddings; crossed raw
    ids, the original's other wide input, can be given to it as their own sparse feature.
    """

    def __init__(self, n_dense: int, embedding_dims: list[int], deep: list[int]) -> None:
        super().__init__()
        width = n_dense + sum(embedding_dims)
        self.wide = nn.Linear(width, 1)
        self.deep = mlp([width, *deep, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([dense, *pooled], dim=1)
        return (self.wide(x) + self.deep(x)).squeeze(1)

    def forward_shared(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        """At least one input is shared and one is not (`serving.model` sends only such)."""
        x = SplitInput.of([dense, *pooled])
        return (x.linear(self.wide) + _after_first(self.deep, x.linear(self.deep[0]))).squeeze(1)


class DeepFM(nn.Module):
    """DeepFM (Guo et al., 2017): first-order terms, a factorization machine's pairwise
    interactions between feature embeddings, and an MLP, all on the same embeddings."""

    def __init__(self, n_dense: int, embedding_dims: list[int], deep: list[int], fm_dim: int) -> None:
        super().__init__()
        self.project = ProjectTo(embedding_dims, fm_dim)
        self.dense_vector = nn.Linear(n_dense, fm_dim, bias=False)  # dense features join the FM as one field
        self.first_order = nn.Linear(n_dense + sum(embedding_dims), 1)
        self.deep = mlp([n_dense + sum(embedding_dims), *deep, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        fields = torch.cat([self.dense_vector(dense).unsqueeze(1), self.project(pooled)], dim=1)  # [B, F+1, k]
        fm = 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1, keepdim=True)
        x = torch.cat([dense, *pooled], dim=1)
        return (self.first_order(x) + fm + self.deep(x)).squeeze(1)

    def forward_shared(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        """The FM's sums over fields are the shared fields' sums plus the per-row fields'.
        At least one input is shared and one is not (`serving.model` sends only such)."""
        fields = [self.dense_vector(dense), *self.project.each(pooled)]
        once = torch.cat([f for f in fields if is_shared(f)])  # [S, k]
        rows = torch.stack([f for f in fields if not is_shared(f)], 1)  # [B, R, k]
        total = once.sum(0, keepdim=True) + rows.sum(1)
        squares = once.pow(2).sum(0, keepdim=True) + rows.pow(2).sum(1)
        fm = 0.5 * (total.pow(2) - squares).sum(dim=1, keepdim=True)
        x = SplitInput.of([dense, *pooled])
        return (x.linear(self.first_order) + fm + _after_first(self.deep, x.linear(self.deep[0]))).squeeze(1)


class CrossLayerV2(nn.Module):
    """x_{l+1} = x_0 * (W x_l + b) + x_l, with W of low rank (DCN-v2's mixture-free form)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.up(self.down(x)) + x


class DCNv2(nn.Module):
    """DCN-v2 (Wang et al., 2021), stacked: cross layers for explicit feature crosses,
    then an MLP for implicit ones."""

    def __init__(self, n_dense: int, embedding_dims: list[int], deep: list[int], cross_layers: int,
                 cross_rank: int) -> None:
        super().__init__()
        width = n_dense + sum(embedding_dims)
        self.cross = nn.ModuleList(CrossLayerV2(width, cross_rank) for _ in range(cross_layers))
        self.deep = mlp([width, *deep, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        x0 = x = torch.cat([dense, *pooled], dim=1)
        for layer in self.cross:
            x = layer(x0, x)
        return self.deep(x).squeeze(1)


def build_model(schema: FeatureSchema, config: TrainerConfig) -> nn.Module:
    """The dense network named by the configuration, shaped by the schema."""
    dims = [schema.table(f.table_name).dim for f in schema.sparse]
    n_dense = len(schema.dense)
    torch.manual_seed(config.seed)
    if config.model == "dlrm":
        return DLRM(n_dense, dims, config.bottom_mlp, config.top_mlp)
    if config.model == "wide_deep":
        return WideAndDeep(n_dense, dims, config.top_mlp)
    if config.model == "deepfm":
        return DeepFM(n_dense, dims, config.top_mlp, fm_dim=min(dims))
    if config.model == "dcn_v2":
        return DCNv2(n_dense, dims, config.top_mlp, config.cross_layers, config.cross_rank)
    raise ValueError(f"unknown model {config.model!r}")
