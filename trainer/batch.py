"""Micro-batches as the model reads them: dense matrix, labels, and per table the unique keys
of the batch with each feature's indices into them.

Deduplicating keys per table once per batch is what makes the sparse step cheap: the
Embedding Variable is read and updated once per distinct key, never once per occurrence.

A batch is built either from per-sample `Features` (`build_batch`) or straight from the
columns of a decoded micro-batch (`build_batch_from_columns`, the trainer's path); both go
through `BatchArrays`, a numpy-only form that crosses process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, Sequence

import numpy as np
import torch

from stream.sample import DecodedBatch, Features
from stream.schema import FeatureSchema
from trainer.embedding import unique_segments


class FeatureBag(NamedTuple):
    """One sparse feature in a batch: indices into its table's unique keys, and bag offsets.
    numpy, not tensors: the training step's pooling kernel reads numpy, and wrapping ~50
    arrays a batch as tensors cost the training process more than the step needed of it.
    A named tuple, as TableKeys: ~50 of them are made per batch on the training thread, at
    0.4-0.6 µs each against 0.8 µs for a frozen dataclass."""

    table: str
    indices: np.ndarray  # int64 [total ids in the batch for this feature]
    offsets: np.ndarray | None  # int64 [batch size]: where each example's bag starts; None: one id each
    mode: str  # "sum" | "mean"


class TableKeys(NamedTuple):
    """The distinct keys of one table in a batch, and how often each occurs (for admission)."""

    keys: np.ndarray  # int64 [U], in first-seen order
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
    """A batch from per-sample `Features` (serving requests, tests)."""
    n = len(features)
    dense = np.array([f.dense for f in features], dtype=np.float32).reshape(n, len(schema.dense))
    per_feature = [_flatten(features, i) for i in range(len(schema.sparse))]
    label_array = None if labels is None else np.asarray(labels, dtype=np.float32)
    return BatchArrays.build(schema, dense, per_feature, label_array).to_batch()


def build_batch_from_columns(schema: FeatureSchema, decoded: DecodedBatch) -> Batch:
    """A batch from a decoded micro-batch's columns (`SampleCodec.decode_batch`)."""
    return BatchArrays.from_decoded(schema, decoded).to_batch()


def sparse_layout(schema: FeatureSchema) -> tuple[list[str], list[str], list[str]]:
    """What `BatchArrays.from_flat` takes beside the arrays: the tables in the order of their
    first feature, and each feature's table and pooling (the schema's, so not sent per batch)."""
    tables = list(dict.fromkeys(f.table_name for f in schema.sparse))
    return tables, [f.table_name for f in schema.sparse], [f.pooling for f in schema.sparse]


@dataclass
class BatchArrays:
    """A `Batch` as numpy arrays only: what a decoding process hands to the training process
    (pickles as raw buffers; `to_batch` wraps them as tensors without copying)."""

    dense: np.ndarray  # float32 [B, n_dense]
    bag_indices: list[np.ndarray]  # int64, per sparse feature
    bag_offsets: list[np.ndarray | None]  # int64 [B] bag starts per sparse feature; None: one id per bag
    tables: dict[str, tuple[np.ndarray, np.ndarray]]  # table -> (unique keys, counts)
    tables_of_bags: list[str]
    modes: list[str]
    labels: np.ndarray | None = None  # float32 [B]

    def __len__(self) -> int:
        return self.dense.shape[0]

    def __reduce__(self) -> tuple:
        """Pickles as its flat arrays: between processes, unpickling ~100 small arrays cost
        the training process more than the bytes did."""
        return (BatchArrays.from_flat, (self.flat(), list(self.tables), self.tables_of_bags, self.modes))

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

    @staticmethod
    def from_flat(flat: Sequence[np.ndarray], table_names: Sequence[str], tables_of_bags: list[str],
                  modes: list[str]) -> "BatchArrays":
        """The inverse of `flat`; the arrays are views of the given ones (no copies)."""
        shape, dense, labels, indices, index_lengths, offsets, multi, keys, counts, key_lengths = flat
        n, n_dense, has_labels = shape.tolist()
        multi = multi.tolist()
        starts = iter(_split(offsets, [n] * sum(multi)))  # a multi-valued feature has one start per example
        key_lengths = key_lengths.tolist()
        return BatchArrays(dense.reshape(n, n_dense), _split(indices, index_lengths.tolist()),
                           [next(starts) if m else None for m in multi],
                           dict(zip(table_names, zip(_split(keys, key_lengths), _split(counts, key_lengths)))),
                           tables_of_bags, modes, labels if has_labels else None)

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
        bags = tuple(
            FeatureBag(t, i, o, m)
            for t, i, o, m in zip(self.tables_of_bags, self.bag_indices, self.bag_offsets, self.modes)
        )
        tables = {name: TableKeys(keys, counts) for name, (keys, counts) in self.tables.items()}
        labels = None if self.labels is None else torch.from_numpy(self.labels)
        return Batch(torch.from_numpy(self.dense), bags, tables, labels)


# what BatchArrays.flat gives, array by array
FLAT_DTYPES = (np.int64, np.float32, np.float32, np.int64, np.int64, np.int64, np.uint8, np.int64, np.int64, np.int64)


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, np.int64)


def _split(flat: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    parts, start = [], 0
    for n in lengths:
        parts.append(flat[start:start + n])
        start += n
    return parts


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
