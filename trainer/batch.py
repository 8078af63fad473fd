"""Micro-batches as the model reads them: dense matrix, labels, and per table the unique keys
of the batch with each feature's indices into them.

Deduplicating keys per table once per batch is what makes the sparse step cheap: the
Embedding Variable is read and updated once per distinct key, never once per occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from stream.sample import Features
from stream.schema import FeatureSchema


@dataclass(frozen=True)
class FeatureBag:
    """One sparse feature in a batch: indices into its table's unique keys, and bag offsets."""

    table: str
    indices: torch.Tensor  # int64 [total ids in the batch for this feature]
    offsets: torch.Tensor  # int64 [batch size]: where each example's bag starts
    mode: str  # "sum" | "mean"


@dataclass(frozen=True)
class TableKeys:
    """The distinct keys of one table in a batch, and how often each occurs (for admission)."""

    keys: np.ndarray  # int64 [U], sorted
    counts: np.ndarray  # int64 [U]


@dataclass(frozen=True)
class Batch:
    dense: torch.Tensor  # float32 [B, n_dense]
    bags: tuple[FeatureBag, ...]  # schema order
    tables: dict[str, TableKeys]
    labels: torch.Tensor | None = None  # float32 [B]

    def __len__(self) -> int:
        return self.dense.shape[0]


def build_batch(schema: FeatureSchema, features: Sequence[Features], labels: Sequence[int] | None = None) -> Batch:
    n = len(features)
    dense = torch.tensor([f.dense for f in features], dtype=torch.float32).reshape(n, len(schema.dense))
    per_feature = [_flatten(features, i) for i in range(len(schema.sparse))]

    by_table: dict[str, list[int]] = {}
    for i, f in enumerate(schema.sparse):
        by_table.setdefault(f.table_name, []).append(i)

    tables: dict[str, TableKeys] = {}
    indices: list[torch.Tensor] = [torch.empty(0)] * len(schema.sparse)
    for table, feature_ids in by_table.items():
        all_keys = np.concatenate([per_feature[i][0] for i in feature_ids])
        uniq, inverse, counts = np.unique(all_keys, return_inverse=True, return_counts=True)
        tables[table] = TableKeys(uniq, counts)
        start = 0
        for i in feature_ids:
            size = len(per_feature[i][0])
            indices[i] = torch.from_numpy(inverse[start:start + size].astype(np.int64, copy=False))
            start += size

    bags = tuple(
        FeatureBag(f.table_name, indices[i], torch.from_numpy(per_feature[i][1]), f.pooling)
        for i, f in enumerate(schema.sparse)
    )
    label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.float32)
    return Batch(dense, bags, tables, label_tensor)


def _flatten(features: Sequence[Features], i: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat keys of sparse feature i across the batch, and each example's start offset."""
    lengths = np.fromiter((len(f.sparse[i]) for f in features), dtype=np.int64, count=len(features))
    offsets = np.zeros(len(features), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    keys = np.fromiter(chain.from_iterable(f.sparse[i] for f in features), dtype=np.int64, count=int(lengths.sum()))
    return keys, offsets
