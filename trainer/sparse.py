"""The sparse half of a model: rows for a batch's distinct keys, pooled per feature.

Two poolings, one result. Read-only scoring (`pool`: serving, `predict`) pools with torch's
embedding_bag over rows from any source (the trainer's Embedding Variables or a serving
node's published tables). The training step pools every feature in one kernel pass over
one flat row buffer that the lookups fill in place (`pooling.pool_concat`), and hands each
table its gradient as a view of that buffer: at Criteo shape this is what
`freshrec bench embedding` measures, and 26 embedding_bag calls forward and backward cost
the step more than the kernel pair. Both sum each bag's rows in bag order (a mean divides
the sum), so serving scores equal the trainer's for the same version and input (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from stream.schema import FeatureSchema
from trainer.batch import Batch, FeatureBag
from trainer.config import EmbeddingDefaults
from trainer.embedding import EmbeddingVariableConfig
from trainer.embedding.pooling import Bags, RowBuffer, pool_concat
from trainer.embedding.variable import EmbeddingVariable

# (table name, distinct keys) -> rows [len(keys), dim]
RowSource = Callable[[str, np.ndarray], torch.Tensor]


def pool(batch: Batch, rows: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """One pooled embedding [B, dim] per sparse feature, from each table's rows for the batch
    (a bag of one id pools to its row, whether summed or averaged)."""
    return [
        F.embedding(torch.from_numpy(bag.indices), rows[bag.table]) if bag.offsets is None else
        F.embedding_bag(torch.from_numpy(bag.indices), rows[bag.table], torch.from_numpy(bag.offsets), mode=bag.mode)
        for bag in batch.bags
    ]


def pool_from(batch: Batch, source: RowSource) -> list[torch.Tensor]:
    return pool(batch, {name: source(name, t.keys) for name, t in batch.tables.items()})


@dataclass
class SparseStep:
    """Rows read for one training step, table t's at part t of `rows`; their gradients go
    back to the tables after backward."""

    keys: dict[str, np.ndarray]
    rows: RowBuffer


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
        """Each table's rows for the batch's distinct keys (counting sightings, creating
        admitted rows), pooled per feature: one [B, dim] view per feature of one tensor."""
        keys = {name: t.keys for name, t in batch.tables.items()}
        part = {name: i for i, name in enumerate(keys)}
        rows = RowBuffer([(k.size, self.tables[name].dim) for name, k in keys.items()])
        for name, t in batch.tables.items():
            self.tables[name].train_lookup(t.keys, t.counts, out=rows.rows(part[name]))
        bags = [_bags(rows, part[bag.table], bag) for bag in batch.bags]
        pooled = pool_concat(rows.values, bags)
        return list(torch.split(pooled, [b.dim for b in bags], dim=1)), SparseStep(keys, rows)

    def apply_gradients(self, step: SparseStep, global_step: int) -> None:
        for i, (name, keys) in enumerate(step.keys.items()):
            grad = step.rows.grad(i)
            if grad is not None:
                self.tables[name].apply_gradients(keys, grad, global_step)

    def maybe_evict(self, global_step: int) -> int:
        return sum(t.maybe_evict(global_step) for t in self.tables.values())

    def lookup(self, table: str, keys: np.ndarray) -> torch.Tensor:
        return self.tables[table].lookup(keys)

    def live_rows(self) -> dict[str, int]:
        return {name: len(t) for name, t in self.tables.items()}


def _bags(rows: RowBuffer, part: int, bag: FeatureBag) -> Bags:
    """A feature's bags for pool_concat, which takes n_bags + 1 bounds (a batch's offsets are
    bag starts), or none when every bag holds one id."""
    bounds = None if bag.offsets is None else np.append(bag.offsets, bag.indices.size)
    return rows.bags(part, bag.indices, bounds, mean=bag.mode == "mean")
