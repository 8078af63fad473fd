"""Configuration of the publisher and of the Redis layout it shares with serving."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class RedisConfig(BaseModel):
    """Redis by URL: redis:// or rediss:// (TLS); a password may sit in the URL or here."""

    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    # TLS (rediss:// URLs): CA bundle to verify the server, and a client certificate if required.
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    prefix: str = "freshrec"
    model: str = "default"

    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, self.model, *(str(p) for p in parts)])


class QualityGateConfig(BaseModel):
    """Hold publishing while the trainer's progressive AUC falls past its trailing level.

    The trailing level is the median AUC of the last `trailing_checks` versions published
    with the gate open. An operator overrides with `freshrec gate open|hold|auto`.
    """

    enabled: bool = False
    auc_margin: float = Field(default=0.02, ge=0)
    trailing_checks: int = Field(default=30, ge=1)
    # No verdict before the trainer has seen this many samples (early AUC is noise).
    min_samples: int = Field(default=20_000, ge=0)


class PublisherConfig(BaseModel):
    interval_s: float = Field(default=2.0, gt=0)
    # A full snapshot every this many versions (a new serving node replays at most that many deltas) ...
    snapshot_every: int = Field(default=20, ge=1)
    # ... or sooner, once the deltas since the last snapshot add up to this fraction of its size.
    snapshot_delta_fraction: float = Field(default=1.0, gt=0)
    # Snapshots kept in Redis; deltas older than the oldest kept snapshot are deleted.
    keep_snapshots: int = Field(default=2, ge=1)
    chunk_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # How embedding rows are stored: fp32 exact; fp16 and row-wise int8 trade precision for bytes.
    row_encoding: Literal["fp32", "fp16", "int8"] = "fp32"
    # zstd saves ~7% on trained fp32 rows (measured: `freshrec bench publisher`); off by default.
    compression: Literal["none", "zstd"] = "none"
    # Versions cut but not yet written; when full, the next cut waits (training goes on).
    max_pending: int = Field(default=2, ge=1)
    gate: QualityGateConfig = Field(default_factory=QualityGateConfig)
