"""The sparse half of a model: rows for a batch's distinct keys, pooled per feature.

Trainer and serving pool with the same function and differ only in where rows come from
(the trainer's Embedding Variables, or a serving node's published tables). That is what
makes serving scores equal the trainer's for the same version and input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from stream.schema import FeatureSchema
from trainer.batch import Batch
from trainer.config import EmbeddingDefaults
from trainer.embedding import EmbeddingVariableConfig
from trainer.embedding.variable import EmbeddingVariable

# (table name, distinct keys) -> rows [len(keys), dim]
RowSource = Callable[[str, np.ndarray], torch.Tensor]


def pool(batch: Batch, rows: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """One pooled embedding [B, dim] per sparse feature, from each table's rows for the batch."""
    return [
        F.embedding_bag(bag.indices, rows[bag.table], bag.offsets, mode=bag.mode)
        for bag in batch.bags
    ]


def pool_from(batch: Batch, source: RowSource) -> list[torch.Tensor]:
    return pool(batch, {name: source(name, t.keys) for name, t in batch.tables.items()})


@dataclass
class SparseStep:
    """Rows read for one training step; their gradients go back to the tables after backward."""

    keys: dict[str, np.ndarray]
    rows: dict[str, torch.Tensor]


class SparseArch:
    """The Embedding Variables of a schema, one per table."""

    def __init__(self, schema: FeatureSchema, defaults: EmbeddingDefaults, seed: int = 0) -> None:
        self.tables: dict[str, EmbeddingVariable] = {
            t.name: EmbeddingVariable(
                EmbeddingVariableConfig(
                    name=t.name,
                    dim=t.dim,
                    default_value=defaults.default_value,
                    init_std=defaults.init_std,
                    seed=seed,
                    optimizer=defaults.optimizer,
                    admission=defaults.admission,
                    eviction=defaults.eviction,
                )
            )
            for t in schema.tables
        }

    def train_forward(self, batch: Batch) -> tuple[list[torch.Tensor], SparseStep]:
        rows: dict[str, torch.Tensor] = {}
        keys: dict[str, np.ndarray] = {}
        for name, t in batch.tables.items():
            r = self.tables[name].train_lookup(t.keys, t.counts)
            rows[name] = r.requires_grad_(True)
            keys[name] = t.keys
        return pool(batch, rows), SparseStep(keys, rows)

    def apply_gradients(self, step: SparseStep, global_step: int) -> None:
        for name, rows in step.rows.items():
            if rows.grad is not None:
                self.tables[name].apply_gradients(step.keys[name], rows.grad, global_step)

    def maybe_evict(self, global_step: int) -> int:
        return sum(t.maybe_evict(global_step) for t in self.tables.values())

    def lookup(self, table: str, keys: np.ndarray) -> torch.Tensor:
        return self.tables[table].lookup(keys)

    def live_rows(self) -> dict[str, int]:
        return {name: len(t) for name, t in self.tables.items()}
