"""Configuration of the publisher and of the Redis layout it shares with serving."""

from __future__ import annotations

from pydantic import BaseModel, Field


class RedisConfig(BaseModel):
    """Redis by URL (redis://, rediss:// for TLS; a password may sit in the URL)."""

    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    prefix: str = "freshrec"
    model: str = "default"

    def key(self, *parts: object) -> str:
        return ":".join([self.prefix, self.model, *(str(p) for p in parts)])


class PublisherConfig(BaseModel):
    interval_s: float = Field(default=2.0, gt=0)
    # A full snapshot every this many versions (a new serving node replays at most that many deltas).
    snapshot_every: int = Field(default=20, ge=1)
    # Snapshots kept in Redis; deltas older than the oldest kept snapshot are deleted.
    keep_snapshots: int = Field(default=2, ge=1)
    chunk_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
