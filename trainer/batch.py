"""Micro-batches as the model reads them: dense matrix, labels, and per table the unique keys
of the batch with each feature's indices into them.

Deduplicating keys per table once per batch is what makes the sparse step cheap: the
Embedding Variable is read and updated once per distinct key, never once per occurrence.

A batch is built either from per-sample `Features` (`build_batch`) or straight from the
columns of a decoded micro-batch (`build_batch_from_columns`, the trainer's path); both go
through `BatchArrays`, whose `flat` arrays are what crosses process boundaries and what a
`Batch` is made of (`batch_from_flat`, no copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from typing import NamedTuple, Sequence

import numpy as np
import torch

from stream.sample import DecodedBatch, Features
from stream.schema import FeatureSchema
from trainer.embedding import unique_segments


class FeatureBag(NamedTuple):
    """One sparse feature in a batch: indices into its table's unique keys, and bag offsets.
    numpy, not tensors: the pooling kernels read numpy."""

    table: str
    indices: np.ndarray  # int64 [total ids in the batch for this feature]
    offsets: np.ndarray | None  # int64 [batch size]: where each example's bag starts; None: one id each
    mode: str  # "sum" | "mean"


class TableKeys(NamedTuple):
    """The distinct keys of one table in a batch, and how often each occurs (for admission)."""

    keys: np.ndarray  # int64 [U], in first-seen order
    counts: np.ndarray  # int64 [U]


class SparseLayout(NamedTuple):
    """A schema's sparse features as a batch lays them out: the tables in the order of their
    first feature, and each feature's table and pooling (the schema's, so not sent per batch)."""

    tables: tuple[str, ...]
    tables_of_bags: tuple[str, ...]
    modes: tuple[str, ...]

    @classmethod
    def of(cls, schema: FeatureSchema) -> "SparseLayout":
        return cls(tuple(dict.fromkeys(f.table_name for f in schema.sparse)),
                   tuple(f.table_name for f in schema.sparse), tuple(f.pooling for f in schema.sparse))


@dataclass(frozen=True)
class SparseIds:
    """A batch's sparse features, flat: every feature's indices back to back (schema order),
    every table's distinct keys back to back (layout order).

    The training step reads these arrays as they are (`SparseArch.train_forward`: one
    lookup per table, one pooling pass over all features); `bags` and `tables` cut them
    per feature and per table for everything else. Flat, a batch handed over from the
    ingest process is ~10 views, not ~80 views and ~50 tuples, and the step does not split
    what it then concatenates again (that cost ~0.2 ms of a 4.7 ms Wide & Deep step)."""

    layout: SparseLayout
    indices: np.ndarray  # int64: feature f's ids as positions among its table's keys
    index_lengths: np.ndarray  # int64 [features]
    starts: np.ndarray  # int64: bag starts (one per example, from 0) of each multi-valued feature in turn
    multi: np.ndarray  # uint8 [features]: 0 when every bag holds one id (no starts)
    keys: np.ndarray  # int64: table t's distinct keys, in first-seen order
    counts: np.ndarray  # int64: how often each key occurs (for admission)
    key_lengths: np.ndarray  # int64 [tables]

    @cached_property
    def bags(self) -> tuple[FeatureBag, ...]:
        n_multi = int(self.multi.sum())
        starts = iter(_split(self.starts, np.full(n_multi, self.starts.size // max(1, n_multi))))  # one per example
        return tuple(FeatureBag(table, indices, next(starts) if is_multi else None, mode)
                     for table, indices, is_multi, mode
                     in zip(self.layout.tables_of_bags, _split(self.indices, self.index_lengths), self.multi.tolist(),
                            self.layout.modes))

    @cached_property
    def tables(self) -> dict[str, TableKeys]:
        return {name: TableKeys(keys, counts) for name, keys, counts
                in zip(self.layout.tables, _split(self.keys, self.key_lengths), _split(self.counts, self.key_lengths))}


@dataclass(frozen=True)
class Batch:
    dense: torch.Tensor  # float32 [B, n_dense]
    sparse: SparseIds
    labels: torch.Tensor | None = None  # float32 [B]

    def __len__(self) -> int:
        return self.dense.shape[0]

    @property
    def bags(self) -> tuple[FeatureBag, ...]:
        """Per sparse feature, in schema order."""
        return self.sparse.bags

    @property
    def tables(self) -> dict[str, TableKeys]:
        return self.sparse.tables


def build_batch(schema: FeatureSchema, features: Sequence[Features], labels: Sequence[int] | None = None) -> Batch:
    """A batch from per-sample `Features` (serving requests, tests)."""
    n = len(features)
    dense = np.array([f.dense for f in features], dtype=np.float32).reshape(n, len(schema.dense))
    per_feature = [_flatten(features, i) for i in range(len(schema.sparse))]
    label_array = None if labels is None else np.asarray(labels, dtype=np.float32)
    return BatchArrays.build(schema, dense, per_feature, label_array).to_batch()


def build_batch_from_columns(schema: FeatureSchema, decoded: DecodedBatch) -> Batch:
    """A batch from a decoded micro-batch's columns (`SampleCodec.decode_batch`)."""
    return BatchArrays.from_decoded(schema, decoded).to_batch()


def batch_from_flat(flat: Sequence[np.ndarray], layout: SparseLayout) -> Batch:
    """The inverse of `BatchArrays.flat`: a `Batch` of the given arrays (no copies)."""
    shape, dense, labels, indices, index_lengths, starts, multi, keys, counts, key_lengths = flat
    n, n_dense, has_labels = shape.tolist()
    return Batch(torch.from_numpy(dense.reshape(n, n_dense)),
                 SparseIds(layout, indices, index_lengths, starts, multi, keys, counts, key_lengths),
                 torch.from_numpy(labels) if has_labels else None)


@dataclass
class BatchArrays:
    """A `Batch` as numpy arrays per feature: how a decoding process builds one, and (`flat`) what it
    hands to the training process (`batch_from_flat` wraps them without copying)."""

    dense: np.ndarray  # float32 [B, n_dense]
    bag_indices: list[np.ndarray]  # int64, per sparse feature
    bag_offsets: list[np.ndarray | None]  # int64 [B] bag starts per sparse feature; None: one id per bag
    tables: dict[str, tuple[np.ndarray, np.ndarray]]  # table -> (unique keys, counts)
    tables_of_bags: list[str]
    modes: list[str]
    labels: np.ndarray | None = None  # float32 [B]

    def __len__(self) -> int:
        return self.dense.shape[0]

    def flat(self) -> list[np.ndarray]:
        """The batch as FLAT_DTYPES arrays, in that order: what crosses between processes."""
        names = list(self.tables)
        lengths = np.array([a.size for a in self.bag_indices], dtype=np.int64)
        shape = np.array([*self.dense.shape, self.labels is not None], dtype=np.int64)
        labels = np.empty(0, np.float32) if self.labels is None else self.labels
        arrays = [shape, self.dense.reshape(-1), labels, _concat(self.bag_indices), lengths,
                  _concat([o for o in self.bag_offsets if o is not None]),
                  np.array([o is not None for o in self.bag_offsets], dtype=np.uint8),
                  _concat([self.tables[n][0] for n in names]), _concat([self.tables[n][1] for n in names]),
                  np.array([self.tables[n][0].size for n in names], dtype=np.int64)]
        return [np.ascontiguousarray(a, dtype) for a, dtype in zip(arrays, FLAT_DTYPES, strict=True)]

    @classmethod
    def build(cls, schema: FeatureSchema, dense: np.ndarray, per_feature: Sequence[tuple[np.ndarray, np.ndarray]],
              labels: np.ndarray | None) -> "BatchArrays":
        """From the dense matrix and, per sparse feature, its flat keys and each example's
        number of ids. A feature with one id in every example gets no offsets (None)."""
        by_table: dict[str, list[int]] = {}
        for i, f in enumerate(schema.sparse):
            by_table.setdefault(f.table_name, []).append(i)
        # every table's keys in one array, a segment per table: one kernel call deduplicates all
        parts = [per_feature[i][0] for feature_ids in by_table.values() for i in feature_ids]
        flat = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)
        table_bounds = np.zeros(len(by_table) + 1, dtype=np.int64)
        np.cumsum([sum(len(per_feature[i][0]) for i in ids) for ids in by_table.values()], out=table_bounds[1:])
        tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        indices: list[np.ndarray] = [np.empty(0, np.int64)] * len(schema.sparse)
        segments = unique_segments(flat, table_bounds)
        for (table, feature_ids), (keys, inverse, counts) in zip(by_table.items(), segments):
            tables[table] = (keys, counts)
            start = 0
            for i in feature_ids:
                end = start + len(per_feature[i][0])
                indices[i] = inverse[start:end]
                start = end
        return cls(np.ascontiguousarray(dense, dtype=np.float32), indices, [_starts(p[1]) for p in per_feature], tables,
                   [f.table_name for f in schema.sparse], [f.pooling for f in schema.sparse], labels)

    @classmethod
    def from_decoded(cls, schema: FeatureSchema, decoded: DecodedBatch) -> "BatchArrays":
        per_feature = [(col.keys, col.lengths) for col in decoded.sparse]
        return cls.build(schema, decoded.dense, per_feature, decoded.labels.astype(np.float32))

    @classmethod
    def from_batch(cls, batch: Batch) -> "BatchArrays":
        return cls(batch.dense.numpy(), [b.indices for b in batch.bags], [b.offsets for b in batch.bags],
                   {name: (t.keys, t.counts) for name, t in batch.tables.items()}, [b.table for b in batch.bags],
                   [b.mode for b in batch.bags], None if batch.labels is None else batch.labels.numpy())

    def to_batch(self) -> Batch:
        return batch_from_flat(self.flat(), SparseLayout(tuple(self.tables), tuple(self.tables_of_bags),
                                                         tuple(self.modes)))


# what BatchArrays.flat gives, array by array
FLAT_DTYPES = tuple(np.dtype(t) for t in (np.int64, np.float32, np.float32, np.int64, np.int64, np.int64, np.uint8,
                                           np.int64, np.int64, np.int64))


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, np.int64)


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    ends = np.cumsum(lengths).tolist()
    return [flat[start:end] for start, end in zip([0, *ends], ends)]


def _starts(lengths: np.ndarray) -> np.ndarray | None:
    """Each bag's start from the bags' lengths; None when every bag holds one id."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if np.all(lengths == 1):
        return None
    starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _flatten(features: Sequence[Features], i: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat keys of sparse feature i across the batch, and each example's number of them."""
    lengths = np.fromiter((len(f.sparse[i]) for f in features), dtype=np.int64, count=len(features))
    keys = np.fromiter(chain.from_iterable(f.sparse[i] for f in features), dtype=np.int64, count=int(lengths.sum()))
    return keys, lengths
