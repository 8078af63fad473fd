"""Embedding Variables: hash-keyed, growing, collision-free tables with admission, eviction,
sparse optimizers whose state lives with the row, and change tracking for the publisher."""

from trainer.embedding.config import (
    AdmissionConfig,
    EmbeddingVariableConfig,
    EvictionConfig,
    SparseOptimizerConfig,
)
from trainer.embedding.keyindex import KeyIndex
from trainer.embedding.pooling import Bags, RowBuffer, bag_sum, pool_concat, unique_columns, unique_ids, unique_segments
from trainer.embedding.variable import EmbeddingVariable, TableChanges

__all__ = [
    "AdmissionConfig",
    "Bags",
    "EmbeddingVariable",
    "EmbeddingVariableConfig",
    "EvictionConfig",
    "KeyIndex",
    "RowBuffer",
    "SparseOptimizerConfig",
    "TableChanges",
    "bag_sum",
    "pool_concat",
    "unique_columns",
    "unique_ids",
    "unique_segments",
]
