"""The sparse half of a model: rows for a batch's distinct keys, pooled per feature.

Two poolings, one result. Read-only scoring (`pool`: serving, `predict`) pools with torch's
embedding_bag over rows from any source (the trainer's Embedding Variables or a serving
node's published tables). The training step pools every feature in one kernel pass over
one flat row buffer that the lookups fill in place (`pooling.pool_planned`, on the batch's
flat ids as they are), and hands each
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
from trainer.batch import Batch, SparseIds, SparseLayout
from trainer.config import EmbeddingDefaults
from trainer.embedding import EmbeddingVariableConfig, kernels
from trainer.embedding.pooling import RowBuffer, pool_planned
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
        self.layout = SparseLayout.of(schema)
        # what the pooling plan takes from the schema (`_pooling_plan` adds each batch's part)
        self._feature_table = np.array([self.layout.tables.index(t) for t in self.layout.tables_of_bags], np.int64)
        self._feature_dims = [self.tables[t].dim for t in self.layout.tables_of_bags]
        self._plan_template = np.zeros((len(self._feature_dims), kernels.POOL_PLAN_COLUMNS), np.int64)
        self._plan_template[:, kernels.POOL_DIM] = self._feature_dims
        self._plan_template[:, kernels.POOL_COL] = np.cumsum([0, *self._feature_dims[:-1]])
        self._plan_template[:, kernels.POOL_MEAN] = [mode == "mean" for mode in self.layout.modes]

    def train_forward(self, batch: Batch) -> tuple[list[torch.Tensor], SparseStep]:
        """Each table's rows for the batch's distinct keys (counting sightings, creating
        admitted rows), pooled per feature: one [B, dim] view per feature of one tensor."""
        ids = batch.sparse
        if ids.layout != self.layout:
            raise ValueError("the batch was laid out for another schema")
        key_lengths = ids.key_lengths.tolist()
        rows = RowBuffer([(n, self.tables[name].dim) for name, n in zip(self.layout.tables, key_lengths)])
        keys, start = {}, 0
        for t, (name, n) in enumerate(zip(self.layout.tables, key_lengths)):
            keys[name] = ids.keys[start:start + n]
            self.tables[name].train_lookup(keys[name], ids.counts[start:start + n], out=rows.rows(t))
            start += n
        pooled = pool_planned(rows.values, self._pooling_plan(rows, ids, len(batch)), ids.indices, ids.starts,
                                len(batch))
        return list(torch.split(pooled, self._feature_dims, dim=1)), SparseStep(keys, rows)

    def _pooling_plan(self, rows: RowBuffer, ids: SparseIds, n: int) -> np.ndarray:
        """The pooling kernels' plan for a flat batch: per feature, where its table's rows lie
        in `rows`, and where its ids and bag starts lie in the batch."""
        plan = self._plan_template.copy()
        plan[:, kernels.POOL_START] = rows.starts[self._feature_table]
        plan[:, kernels.POOL_ROWS] = ids.key_lengths[self._feature_table]
        plan[:, kernels.POOL_IDS] = ids.index_lengths
        plan[1:, kernels.POOL_FIRST] = np.cumsum(ids.index_lengths[:-1])
        multi = ids.multi.astype(bool)
        n_multi_before = np.cumsum(multi) - multi
        plan[:, kernels.POOL_BOUNDS] = np.where(multi, n_multi_before * n, -1)  # n starts per multi-valued feature
        return plan

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

