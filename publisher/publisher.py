"""Every publish interval, a version: cut on the training thread, written off it.

The cut happens between two training steps, so sparse rows, dense parameters, offsets and
watermark all belong to one global step. Copying the changed rows is the only work done
on the training thread; encoding and Redis writes happen on a writer thread behind a
bounded queue. When Redis is slow the queue fills and the next cut simply waits: training
goes on, its changes accumulate in the tables' change stamps (bounded by the table), and
the next version carries all of them. Nothing is dropped, memory stays bounded.
Change-log entries are released only after the version that carries them is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import redis
from prometheus_client import Counter, Gauge, Histogram

from publisher.config import PublisherConfig
from publisher.gate import QualityGate
from publisher.manifest import Manifest
from publisher.payload import Compression, Kind, Payload, RowEncoding, encode
from publisher.redis_store import RedisVersionStore
from trainer.checkpoint import learner_arrays, table_delta_arrays, table_snapshot_arrays
from trainer.learner import OnlineLearner
from trainer.loop import Position

log = logging.getLogger(__name__)

PUBLISHED_VERSION = Gauge("freshrec_publisher_version", "Newest version durably published")
PUBLISH_SECONDS = Histogram("freshrec_publisher_write_seconds", "Encode and write time of a version",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PUBLISH_BYTES = Counter("freshrec_publisher_bytes", "Payload bytes written", ["kind"])
ROWS_PUBLISHED = Counter("freshrec_publisher_rows", "Rows published in deltas")
TOMBSTONES_PUBLISHED = Counter("freshrec_publisher_tombstones", "Evicted keys published as tombstones")
WRITE_ERRORS = Counter("freshrec_publisher_write_errors", "Failed attempts to write a version (retried)")
GATE_OPEN = Gauge("freshrec_publisher_gate_open", "1 while the quality gate lets versions through")
CUTS_DEFERRED = Counter("freshrec_publisher_cuts_deferred", "Cuts postponed because the writer was behind")

_ROW_ENCODINGS = {"fp32": RowEncoding.FP32, "fp16": RowEncoding.FP16, "int8": RowEncoding.INT8}
_COMPRESSIONS = {"none": Compression.NONE, "zstd": Compression.ZSTD}


@dataclass
class VersionCut:
    manifest: Manifest
    payloads: dict[Kind, Payload]  # serving's delta and/or snapshot, and the trainer's own
    cursors: dict[str, int]


@dataclass
class PublisherStats:
    published_version: int = 0
    last_bytes: int = 0
    snapshot_bytes: int = 0  # size of the newest snapshot
    delta_bytes_since_snapshot: int = 0
    durable: list[tuple[int, dict[str, int]]] = field(default_factory=list)


class Publisher:
    """A training-loop hook (trainer.loop.StepHook) that publishes versions to Redis."""

    def __init__(self, store: RedisVersionStore, config: PublisherConfig) -> None:
        self.store = store
        self.config = config
        self.stats = PublisherStats()
        self.gate = QualityGate(config.gate, store.gate_override)
        self.next_version = (store.head() or 0) + 1
        self._first = True  # the first version of this trainer has no delta: it is a snapshot
        self._cursors: dict[str, int] = {}
        self._last_cut = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue[VersionCut | None] = queue.Queue(maxsize=config.max_pending)
        self._failure: BaseException | None = None
        self._lost_base = threading.Event()  # Redis lost the chain: the next cut carries a snapshot
        self._writer = threading.Thread(target=self._write_loop, name="publisher-writer", daemon=True)
        self._writer.start()
        GATE_OPEN.set(1)

    # ---- training thread -----------------------------------------------------------

    def after_step(self, learner: OnlineLearner, position: Position) -> None:
        self._raise_writer_failure()
        self._release_durable(learner)
        if time.monotonic() - self._last_cut < self.config.interval_s:
            return
        if self._queue.full():
            CUTS_DEFERRED.inc()  # the writer is behind: cut later, with everything in it
            return
        self._last_cut = time.monotonic()
        verdict = self.gate.check(learner.metrics.auc(), learner.samples_seen)
        GATE_OPEN.set(int(verdict.open))
        if verdict.open:
            self.publish(learner, position)

    def close(self, learner: OnlineLearner, position: Position) -> None:
        """Publish what the trainer learned last (unless the gate holds), and wait until durable."""
        if self.gate.verdict.open:
            self.publish(learner, position)
        self._queue.put(None)
        self._writer.join()
        self._raise_writer_failure()
        self._release_durable(learner)

    def publish(self, learner: OnlineLearner, position: Position) -> None:
        self._last_cut = time.monotonic()
        self._queue.put(self._cut(learner, position))  # blocks only when called directly while full

    def resume(self, version: int, cursors: dict[str, int]) -> None:
        """Continue the chain after `version`, which the learner was restored to exactly:
        the next version is a delta on it, so serving nodes need no reload."""
        self.next_version = version + 1
        self._cursors = dict(cursors)
        self._first = False

    def _cut(self, learner: OnlineLearner, position: Position) -> VersionCut:
        version = self.next_version
        self.next_version += 1
        trainer_state = learner_arrays(learner)
        dense = {k: v for k, v in trainer_state.items() if k.startswith("dense/")}
        lossy = frozenset(f"table/{name}/values" for name in learner.sparse.tables)
        payloads: dict[Kind, Payload] = {}
        cursors: dict[str, int] = {}
        rows = tombstones = 0
        if not self._first:
            serving, training = dict(dense), dict(trainer_state)
            for name, table in learner.sparse.tables.items():
                changes = table.changes_since(self._cursors.get(name, 0))
                serving |= {f"table/{name}/keys": changes.keys, f"table/{name}/values": changes.values,
                            f"table/{name}/tombstones": changes.tombstones}
                training |= table_delta_arrays(learner, name, changes.keys, changes.values, changes.tombstones)
                cursors[name] = changes.cursor
                rows += len(changes.keys)
                tombstones += len(changes.tombstones)
            payloads[Kind.DELTA] = Payload(Kind.DELTA, version, version - 1, serving, lossy)
            payloads[Kind.TRAIN_DELTA] = Payload(Kind.TRAIN_DELTA, version, version - 1, training)
        if self._first or self._snapshot_due(version):
            serving, training = dict(dense), dict(trainer_state)
            for name, table in learner.sparse.tables.items():
                state = table.state_dict()  # one copy of the rows serves both snapshots
                training |= table_snapshot_arrays(name, state)
                serving |= {f"table/{name}/keys": state["keys"], f"table/{name}/values": state["values"],
                            f"table/{name}/default": np.array(table.config.default_value, dtype=np.float32)}
                cursors.setdefault(name, table.mark())
            payloads[Kind.SNAPSHOT] = Payload(Kind.SNAPSHOT, version, 0, serving, lossy)
            payloads[Kind.TRAIN_SNAPSHOT] = Payload(Kind.TRAIN_SNAPSHOT, version, 0, training)
        self._cursors.update(cursors)
        self._first = False
        manifest = Manifest(
            model=self.store.config.model,
            version=version,
            base_version=version - 1 if Kind.DELTA in payloads else 0,
            global_step=learner.global_step,
            topic=position.topic,
            offsets=dict(position.offsets),
            watermark=position.watermark,
            newest_produced_ms=position.newest_produced_ms,
            created_at=time.time(),
            rows_changed=rows,
            tombstones=tombstones,
            live_rows=learner.sparse.live_rows(),
        )
        return VersionCut(manifest, payloads, cursors)

    def _snapshot_due(self, version: int) -> bool:
        """Every snapshot_every versions, or once the chain of deltas since the last snapshot
        weighs more than a fraction of it: a new node then loads one snapshot and a short chain."""
        with self._lock:
            chain, snapshot = self.stats.delta_bytes_since_snapshot, self.stats.snapshot_bytes
        by_size = snapshot > 0 and chain > self.config.snapshot_delta_fraction * snapshot
        if self._lost_base.is_set():
            self._lost_base.clear()
            return True
        return version % self.config.snapshot_every == 0 or by_size

    def _release_durable(self, learner: OnlineLearner) -> None:
        with self._lock:
            durable, self.stats.durable = self.stats.durable, []
        for _version, cursors in durable:
            for name, cursor in cursors.items():
                learner.sparse.tables[name].release(cursor)

    # ---- writer thread -------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            while (cut := self._queue.get()) is not None:
                self._write_until_done(cut)
        except BaseException as e:  # a bug, not Redis: stop the trainer rather than publish nothing
            self._failure = e
            log.exception("the publisher's writer failed")

    def _raise_writer_failure(self) -> None:
        """A dead writer must not leave the trainer learning what nobody will ever publish:
        fail loudly; a restart resumes from the newest published version."""
        if self._failure is not None:
            raise RuntimeError("the publisher's writer thread failed") from self._failure

    def _write_until_done(self, cut: VersionCut) -> None:
        backoff = 0.1
        while True:
            try:
                self._write(cut)
                return
            except redis.RedisError as e:
                WRITE_ERRORS.inc()
                log.warning("publishing version %d failed (%s); retrying in %.1fs", cut.manifest.version, e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _write(self, cut: VersionCut) -> None:
        started = time.monotonic()
        m = cut.manifest
        rows = _ROW_ENCODINGS[self.config.row_encoding]
        compression = _COMPRESSIONS[self.config.compression]
        if Kind.SNAPSHOT not in cut.payloads and self.store.head() != m.base_version:
            # Flushed or restarted empty (or another trainer publishes this model): a delta on a
            # version Redis no longer has helps nobody. Serving keeps its last good version
            # until the snapshot this triggers arrives.
            log.warning("Redis head is not version %d: the next version will carry a snapshot", m.base_version)
            self._lost_base.set()
        sizes = {}
        for kind, payload in cut.payloads.items():
            data = encode(payload, rows=rows, compression=compression)  # only serving rows are lossy
            m.set_ref(kind, self.store.write_payload(kind, m.version, data, self.config.chunk_bytes))
            sizes[kind] = len(data)
            PUBLISH_BYTES.labels(kind.name.lower()).inc(len(data))
        self.store.commit(m)
        if Kind.SNAPSHOT in cut.payloads:
            self.store.retain(self.config.keep_snapshots)
        elapsed = time.monotonic() - started
        with self._lock:
            self.stats.durable.append((m.version, cut.cursors))
            self.stats.published_version = m.version
            self.stats.last_bytes = sum(sizes.values())
            if Kind.SNAPSHOT in sizes:
                self.stats.snapshot_bytes = sizes[Kind.SNAPSHOT]
                self.stats.delta_bytes_since_snapshot = 0
            else:
                self.stats.delta_bytes_since_snapshot += sizes.get(Kind.DELTA, 0)
        PUBLISHED_VERSION.set(m.version)
        PUBLISH_SECONDS.observe(elapsed)
        ROWS_PUBLISHED.inc(m.rows_changed)
        TOMBSTONES_PUBLISHED.inc(m.tombstones)
        log.debug("published version %d (%d bytes, %d rows, %d tombstones) in %.3fs", m.version,
                  self.stats.last_bytes, m.rows_changed, m.tombstones, elapsed)
