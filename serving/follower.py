"""Follows published versions: newest snapshot plus the deltas after it at start, then each
new version as the stream announces it (blocking reads, not polling).

Whatever goes wrong upstream (a gap in the chain, a bad checksum, Redis gone) the node
keeps serving its last good version, records why it is behind, and recovers from the
newest snapshot when it can.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from publisher.payload import Kind, PayloadError, decode
from publisher.redis_store import RedisVersionStore
from serving.model import ServingModel
from stream.schema import FeatureSchema
from trainer.config import TrainerConfig

log = logging.getLogger(__name__)


@dataclass
class FollowerHealth:
    head: int | None = None
    last_error: str | None = None
    last_error_at: float = 0.0
    versions_applied: int = 0
    reloads: int = 0


class VersionFollower:
    def __init__(self, store: RedisVersionStore, schema: FeatureSchema, trainer_config: TrainerConfig,
                 block_ms: int = 1000) -> None:
        self.store = store
        self.schema = schema
        self.trainer_config = trainer_config
        self.block_ms = block_ms
        self.current: ServingModel | None = None
        self.applied_at: float = 0.0
        self.health = FollowerHealth()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=self.block_ms / 1000 + 5)

    # ---- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        stream_id = "0-0"
        needs_reload = True
        while not self._stop.is_set():
            try:
                if needs_reload:
                    # Read the stream position first: a version published while we load is still seen.
                    stream_id = self.store.last_stream_id()
                    self._load_newest()
                    needs_reload = False
                for stream_id, version in self.store.wait_for_versions(stream_id, self.block_ms):
                    self.health.head = max(self.health.head or 0, version)
                    self._catch_up(version)
            except (redis.RedisError, PayloadError, _Gap) as e:
                self._record_error(e)
                needs_reload = True
                self._stop.wait(1.0)

    def _load_newest(self) -> None:
        head = self.store.head()
        self.health.head = head
        if head is None or (self.current is not None and self.current.version == head):
            return
        snapshot = self.store.newest_snapshot(at_or_before=head)
        if snapshot is None:
            raise _Gap(f"no snapshot at or before head {head}")
        if self.current is None or self.current.version < snapshot or self.current.version > head:
            self._install(self._load_snapshot(snapshot))
            self.health.reloads += 1
        self._catch_up(head)

    def _catch_up(self, target: int) -> None:
        if self.current is None:  # nothing loaded yet: the first announced version starts us
            self._load_newest()
        while self.current is not None and self.current.version < target:
            self._apply(self.current.version + 1)

    def _apply(self, version: int) -> None:
        manifest = self.store.manifest(version)
        if manifest is None:
            raise _Gap(f"version {version} is not in Redis")
        assert self.current is not None
        if manifest.delta is not None and manifest.base_version == self.current.version:
            payload = decode(self.store.read_payload(Kind.DELTA, version, manifest.delta))
            self._install(self.current.apply_delta(manifest, payload))
        elif manifest.snapshot is not None:
            self._install(self._load_snapshot(version))
        else:
            raise _Gap(f"version {version} applies on {manifest.base_version}, node has {self.current.version}")

    def _load_snapshot(self, version: int) -> ServingModel:
        manifest = self.store.manifest(version)
        if manifest is None or manifest.snapshot is None:
            raise _Gap(f"snapshot {version} is not in Redis")
        payload = decode(self.store.read_payload(Kind.SNAPSHOT, version, manifest.snapshot))
        return ServingModel.from_snapshot(manifest, payload, self.schema, self.trainer_config)

    def _install(self, model: ServingModel) -> None:
        self.current = model  # one reference swap: requests see the old or the new version, whole
        self.applied_at = time.time()
        self.health.versions_applied += 1
        self.health.last_error = None
        log.debug("serving version %d", model.version)

    def _record_error(self, error: Exception) -> None:
        self.health.last_error = f"{type(error).__name__}: {error}"
        self.health.last_error_at = time.time()
        log.warning("version follower: %s (still serving version %s)", self.health.last_error,
                    self.current.version if self.current else None)


class _Gap(Exception):
    """The chain from the node's version to the head is broken."""
