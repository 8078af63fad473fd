"""Resume a trainer from the newest published version: its training state and its offsets.

The state is the newest train snapshot plus the train deltas after it, replayed in order,
so a restarted trainer is where the newest version was, and reads Kafka from that
version's offsets: no sample is lost, and at most what was learned after that version (one
publish interval) is learned again.

One thing is not carried by deltas: admission counters of keys still waiting for
admission; they come back as of the train snapshot (configurable, `snapshot_every`).
With admission off, resume is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from publisher.payload import Kind, decode
from publisher.redis_store import RedisVersionStore
from trainer.checkpoint import apply_table_delta, load_learner_arrays, load_table_snapshot
from trainer.learner import OnlineLearner
from trainer.loop import Position

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    version: int
    position: Position


def restore_learner(store: RedisVersionStore, learner: OnlineLearner, topic: str) -> Restored | None:
    """Load the newest version's training state into `learner`; None if there is none to resume."""
    head = store.head()
    if head is None:
        return None
    start = _newest_train_snapshot(store, head)
    if start is None:
        log.warning("versions up to %d exist but none carries a train snapshot: starting afresh", head)
        return None
    manifest = store.manifest(start)
    if manifest.topic != topic:
        log.warning("published versions learned topic %r, not %r: starting afresh", manifest.topic, topic)
        return None
    snapshot = decode(store.read_payload(Kind.TRAIN_SNAPSHOT, start, manifest.train_snapshot)).arrays
    load_table_snapshot(learner, snapshot)
    load_learner_arrays(learner, snapshot)
    for version in range(start + 1, head + 1):
        next_manifest = store.manifest(version)
        if next_manifest is None or next_manifest.train_delta is None or next_manifest.base_version != version - 1:
            log.warning("train state chain breaks at version %d: resuming from %d", version, manifest.version)
            break
        manifest = next_manifest
        delta = decode(store.read_payload(Kind.TRAIN_DELTA, version, manifest.train_delta)).arrays
        apply_table_delta(learner, delta)
        load_learner_arrays(learner, delta)
    position = Position(topic=topic, offsets=dict(manifest.offsets), watermark=manifest.watermark,
                        newest_produced_ms=manifest.newest_produced_ms)
    log.info("resumed from version %d (global step %d, %d samples)", manifest.version, learner.global_step,
             learner.samples_seen)
    return Restored(manifest.version, position)


def _newest_train_snapshot(store: RedisVersionStore, head: int) -> int | None:
    version = store.newest_snapshot(at_or_before=head)
    while version is not None:
        manifest = store.manifest(version)
        if manifest is not None and manifest.train_snapshot is not None:
            return version
        version = store.newest_snapshot(at_or_before=version - 1)
    return None
