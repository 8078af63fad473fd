"""Configuration of the streaming trainer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from trainer.embedding.config import AdmissionConfig, EvictionConfig, SparseOptimizerConfig


class EmbeddingDefaults(BaseModel):
    """Applied to every table of the schema (per-table overrides can come later)."""

    optimizer: SparseOptimizerConfig = Field(default_factory=SparseOptimizerConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    eviction: EvictionConfig = Field(default_factory=EvictionConfig)
    init_std: float = 0.01
    default_value: float = 0.0


class TrainerConfig(BaseModel):
    model: Literal["dlrm", "deepfm", "wide_deep", "dcn_v2"] = "dlrm"
    batch_size: int = Field(default=512, ge=1)
    # A micro-batch closes when full or when this long has passed since its first sample.
    max_batch_wait_ms: int = Field(default=200, ge=1)
    dense_lr: float = Field(default=1e-3, gt=0)
    # DLRM's MLP on dense features; its last width is the interaction dimension.
    bottom_mlp: list[int] = Field(default_factory=lambda: [64, 16])
    # DLRM's top MLP, and the deep tower of DeepFM, Wide & Deep and DCN-v2.
    top_mlp: list[int] = Field(default_factory=lambda: [64, 32])
    cross_layers: int = Field(default=3, ge=1, description="DCN-v2 cross layers")
    cross_rank: int = Field(default=32, ge=1, description="DCN-v2 low-rank cross weight")
    embedding: EmbeddingDefaults = Field(default_factory=EmbeddingDefaults)
    seed: int = 0
    # Intra-op threads for the training step (0: torch's default, one per core). One leaves
    # the other cores to the ingest process and the publisher's writer; OpenMP threads that
    # spin on an oversubscribed machine cost more than they give at these batch sizes.
    torch_threads: int = Field(default=1, ge=0)
    # Prometheus metrics of the trainer process are served on this port (0: not served).
    metrics_port: int = Field(default=9100, ge=0)
    metrics_host: str = "127.0.0.1"
    # Progressive validation window (samples) for the rolling AUC and log loss.
    metrics_window: int = Field(default=20_000, ge=100)
