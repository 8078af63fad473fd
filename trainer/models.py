"""Dense networks that read dense features and pooled embeddings and return a logit.

The dense part is an ordinary torch module trained with torch.optim; its parameters are
published as named tensors. Sparse rows are not in it: they live in Embedding Variables.
"""

from __future__ import annotations

import torch
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


class DLRM(nn.Module):
    """DLRM (Naumov et al., 2019): bottom MLP on dense features, pairwise dot products
    between it and every pooled embedding, top MLP on those interactions.

    Embeddings whose dimension differs from the bottom MLP's output are projected to it,
    so schemas with mixed table dimensions work unchanged.
    """

    def __init__(self, n_dense: int, embedding_dims: list[int], bottom: list[int], top: list[int]) -> None:
        super().__init__()
        d = bottom[-1]
        self.bottom = mlp([n_dense, *bottom])
        self.projections = nn.ModuleList(
            nn.Identity() if dim == d else nn.Linear(dim, d, bias=False) for dim in embedding_dims
        )
        n_vectors = len(embedding_dims) + 1
        rows, cols = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.top = mlp([d + len(rows), *top, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense)
        vectors = torch.stack([x, *(p(e) for p, e in zip(self.projections, pooled))], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self.pair_rows, self.pair_cols]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)


def build_model(schema: FeatureSchema, config: TrainerConfig) -> nn.Module:
    """The dense network named by the configuration, shaped by the schema."""
    dims = [schema.table(f.table_name).dim for f in schema.sparse]
    torch.manual_seed(config.seed)
    if config.model == "dlrm":
        return DLRM(len(schema.dense), dims, config.bottom_mlp, config.top_mlp)
    raise ValueError(f"unknown model {config.model!r}")
