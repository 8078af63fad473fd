"""Configuration of an Embedding Variable (DeepRec's term; Monolith: collisionless table).

Explicit dataclass-like models in the TorchRec manner: one per concern, composed per table.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AdmissionConfig(BaseModel):
    """A key gets a trainable row only after it has been seen `filter_freq` times.

    Until then its lookup returns the default value and no gradient is applied to it.
    `filter_freq` <= 1 admits every key at first sight.
    """

    model_config = ConfigDict(extra="forbid")

    filter_freq: int = Field(default=0, ge=0, le=2**31 - 1)  # counts are stored in 32 bits
    kind: Literal["counter", "bloom"] = "counter"
    # Counting Bloom filter sizing: expected distinct keys and the false-positive rate wanted.
    bloom_capacity: int = Field(default=10_000_000, ge=1)
    bloom_fp_rate: float = Field(default=0.01, gt=0, lt=1)


class EvictionConfig(BaseModel):
    """Rows are removed while training runs; each removal reaches serving as a tombstone."""

    model_config = ConfigDict(extra="forbid")

    # A row not updated for this many global steps is removed (0: off).
    steps_to_live: int = Field(default=0, ge=0)
    # A row whose L2 norm falls under this is removed (0: off).
    l2_threshold: float = Field(default=0.0, ge=0)
    # Eviction runs every this many steps.
    every_n_steps: int = Field(default=100, ge=1)


class SparseOptimizerConfig(BaseModel):
    """Optimizer for sparse rows; its state lives with the row."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sgd", "adagrad", "rowwise_adagrad", "adagrad_decay", "lazy_adam"] = "adagrad"
    lr: float = Field(default=0.05, gt=0)
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    # lazy_adam
    beta1: float = 0.9
    beta2: float = 0.999
    # adagrad_decay (DeepRec's AdagradDecay): the accumulator is multiplied by decay_rate
    # every decay_step global steps, floored at the baseline.
    accumulator_decay_rate: float = 0.9
    accumulator_decay_step: int = 100_000
    accumulator_baseline: float = 0.0


class EmbeddingVariableConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    dim: int = Field(ge=1)
    # Value every component of an absent or unadmitted key's row reads as (trainer and serving).
    default_value: float = 0.0
    # New rows are drawn from N(0, init_std^2), seeded by (seed, key): reproducible across runs.
    init_std: float = 0.01
    seed: int = 0
    optimizer: SparseOptimizerConfig = Field(default_factory=SparseOptimizerConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    eviction: EvictionConfig = Field(default_factory=EvictionConfig)
    # Initial capacity in rows; the table grows as needed.
    initial_capacity: int = Field(default=1 << 16, ge=16)
