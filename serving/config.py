"""Configuration of a serving node."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ServingConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    max_examples: int = Field(default=1024, ge=1, description="examples or candidates per request (more: 413)")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="request body limit (more: 413)")
    # How long one blocking read on the version stream waits before re-checking the head.
    follow_block_ms: int = Field(default=1000, ge=10)
    # /readyz answers 503 when the node is more than this many versions behind the head (None: no bound).
    max_lag_versions: int | None = Field(default=30, ge=0)
    # ... or when it is behind and its version is older than this many seconds (None: no bound).
    max_lag_seconds: float | None = Field(default=None, gt=0)
    # Bearer token of the admin API (/admin/*); None disables it (404).
    admin_token: str | None = None
    # Intra-op threads per worker: 1 keeps per-request latency low when requests run concurrently.
    torch_threads: int = Field(default=1, ge=1)
