"""Every publish interval, a version: cut on the training thread, written off it.

The cut happens between two training steps, so sparse rows, dense parameters, offsets and
watermark all belong to one global step. Copying the changed rows is the only work done
on the training thread; encoding and Redis writes happen on a writer thread behind a
bounded queue. When Redis is slow the queue fills and training waits: memory stays
bounded and no change is ever dropped. Change-log entries are released only after the
version that carries them is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import redis

from publisher.config import PublisherConfig
from publisher.manifest import Manifest
from publisher.payload import Kind, Payload, encode
from publisher.redis_store import RedisVersionStore
from trainer.learner import OnlineLearner
from trainer.loop import Position

log = logging.getLogger(__name__)


@dataclass
class VersionCut:
    manifest: Manifest
    delta: dict[str, np.ndarray] | None
    snapshot: dict[str, np.ndarray] | None
    cursors: dict[str, int]


@dataclass
class PublisherStats:
    published_version: int = 0
    published_at: float = 0.0
    last_write_s: float = 0.0
    last_bytes: int = 0
    write_errors: int = 0
    durable: list[tuple[int, dict[str, int]]] = field(default_factory=list)


class Publisher:
    """A training-loop hook (trainer.loop.StepHook) that publishes versions to Redis."""

    def __init__(self, store: RedisVersionStore, config: PublisherConfig, queue_size: int = 2) -> None:
        self.store = store
        self.config = config
        self.stats = PublisherStats()
        head = store.head()
        self.next_version = (head or 0) + 1
        self._first = True  # the first version of this trainer has no delta: it is a snapshot
        self._cursors: dict[str, int] = {}
        self._last_cut = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue[VersionCut | None] = queue.Queue(maxsize=queue_size)
        self._writer = threading.Thread(target=self._write_loop, name="publisher-writer", daemon=True)
        self._writer.start()

    # ---- training thread -----------------------------------------------------------

    def after_step(self, learner: OnlineLearner, position: Position) -> None:
        self._release_durable(learner)
        if time.monotonic() - self._last_cut >= self.config.interval_s:
            self.publish(learner, position)

    def close(self, learner: OnlineLearner, position: Position) -> None:
        """Publish what the trainer learned last, and wait until it is durable."""
        self.publish(learner, position)
        self._queue.put(None)
        self._writer.join()
        self._release_durable(learner)

    def publish(self, learner: OnlineLearner, position: Position) -> None:
        self._last_cut = time.monotonic()
        cut = self._cut(learner, position)
        self._queue.put(cut)  # blocks when the writer is behind: backpressure, not loss

    def _cut(self, learner: OnlineLearner, position: Position) -> VersionCut:
        version = self.next_version
        self.next_version += 1
        take_snapshot = self._first or version % self.config.snapshot_every == 0
        dense = {f"dense/{k}": v.detach().numpy().copy() for k, v in learner.model.state_dict().items()}

        delta: dict[str, np.ndarray] | None = None
        rows_changed = tombstones = 0
        cursors: dict[str, int] = {}
        if not self._first:
            delta = dict(dense)
            for name, table in learner.sparse.tables.items():
                changes = table.changes_since(self._cursors.get(name, 0))
                delta[f"table/{name}/keys"] = changes.keys
                delta[f"table/{name}/values"] = changes.values
                delta[f"table/{name}/tombstones"] = changes.tombstones
                cursors[name] = changes.cursor
                rows_changed += len(changes.keys)
                tombstones += len(changes.tombstones)

        snapshot: dict[str, np.ndarray] | None = None
        if take_snapshot:
            snapshot = dict(dense)
            for name, table in learner.sparse.tables.items():
                full = table.changes_since(0)
                snapshot[f"table/{name}/keys"] = full.keys
                snapshot[f"table/{name}/values"] = full.values
                snapshot[f"table/{name}/default"] = np.array(table.config.default_value, dtype=np.float32)
                cursors.setdefault(name, full.cursor)

        self._cursors.update(cursors)
        self._first = False
        manifest = Manifest(
            model=self.store.config.model,
            version=version,
            base_version=version - 1 if delta is not None else 0,
            global_step=learner.global_step,
            topic=position.topic,
            offsets=dict(position.offsets),
            watermark=position.watermark,
            newest_produced_ms=position.newest_produced_ms,
            created_at=time.time(),
            rows_changed=rows_changed,
            tombstones=tombstones,
            live_rows=learner.sparse.live_rows(),
        )
        return VersionCut(manifest, delta, snapshot, cursors)

    def _release_durable(self, learner: OnlineLearner) -> None:
        with self._lock:
            durable, self.stats.durable = self.stats.durable, []
        for _version, cursors in durable:
            for name, cursor in cursors.items():
                learner.sparse.tables[name].release(cursor)

    # ---- writer thread -------------------------------------------------------------

    def _write_loop(self) -> None:
        while (cut := self._queue.get()) is not None:
            self._write_until_done(cut)

    def _write_until_done(self, cut: VersionCut) -> None:
        backoff = 0.1
        while True:
            try:
                self._write(cut)
                return
            except redis.RedisError as e:
                self.stats.write_errors += 1
                log.warning("publishing version %d failed (%s); retrying in %.1fs", cut.manifest.version, e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _write(self, cut: VersionCut) -> None:
        started = time.monotonic()
        m = cut.manifest
        size = 0
        if cut.delta is not None:
            data = encode(Payload(Kind.DELTA, m.version, m.base_version, cut.delta))
            m.delta = self.store.write_payload(Kind.DELTA, m.version, data, self.config.chunk_bytes)
            size += len(data)
        if cut.snapshot is not None:
            data = encode(Payload(Kind.SNAPSHOT, m.version, 0, cut.snapshot))
            m.snapshot = self.store.write_payload(Kind.SNAPSHOT, m.version, data, self.config.chunk_bytes)
            size += len(data)
        self.store.commit(m)
        if cut.snapshot is not None:
            self.store.retain(self.config.keep_snapshots)
        with self._lock:
            self.stats.durable.append((m.version, cut.cursors))
            self.stats.published_version = m.version
            self.stats.published_at = time.time()
            self.stats.last_write_s = time.monotonic() - started
            self.stats.last_bytes = size
        log.debug("published version %d (%d bytes, %d rows, %d tombstones) in %.3fs", m.version, size,
                  m.rows_changed, m.tombstones, self.stats.last_write_s)
