"""Embedding Variables: hash-keyed, growing, collision-free tables with admission, eviction,
sparse optimizers whose state lives with the row, and change tracking for the publisher."""

from trainer.embedding.config import (
    AdmissionConfig,
    EmbeddingVariableConfig,
    EvictionConfig,
    SparseOptimizerConfig,
)

__all__ = ["AdmissionConfig", "EmbeddingVariableConfig", "EvictionConfig", "SparseOptimizerConfig"]
