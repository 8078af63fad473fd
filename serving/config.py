"""Configuration of a serving node."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ServingConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    max_examples: int = Field(default=1024, ge=1, description="examples or candidates per request")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # How long one blocking read on the version stream waits before re-checking the head.
    follow_block_ms: int = Field(default=1000, ge=10)
