"""The manifest: what a version is, as JSON beside its binary payloads.

A version is a consistent cut of the model at one global step: sparse and dense
parameters, the Kafka offsets learned so far and the event-time watermark.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from publisher.payload import Kind


class PayloadRef(BaseModel):
    bytes: int
    chunks: int
    checksum: int  # xxh3-64 of the whole payload, to catch a chunk swapped for another version's


class Manifest(BaseModel):
    model: str
    version: int = Field(ge=1)
    # The delta applies on top of this version. A version with no delta (the first one of a
    # trainer incarnation) must be loaded from its snapshot.
    base_version: int = Field(ge=0)
    global_step: int
    topic: str
    offsets: dict[int, int]  # partition -> next offset to read
    watermark: float  # newest event time learned
    newest_produced_ms: int  # newest Kafka timestamp learned
    created_at: float  # unix seconds, when the cut was taken
    delta: PayloadRef | None = None
    snapshot: PayloadRef | None = None
    # The trainer's own state at this version (optimizer state, counters): for exact resume.
    train_delta: PayloadRef | None = None
    train_snapshot: PayloadRef | None = None
    rows_changed: int = 0
    tombstones: int = 0
    live_rows: dict[str, int] = Field(default_factory=dict)

    def ref(self, kind: Kind) -> PayloadRef | None:
        return getattr(self, kind.name.lower())

    def set_ref(self, kind: Kind, ref: PayloadRef) -> None:
        setattr(self, kind.name.lower(), ref)
