"""Follows published versions: newest snapshot plus the deltas after it at start, then each
new version as the stream announces it (blocking reads, not polling).

Whatever goes wrong upstream (a gap in the chain, a bad checksum, a flushed or unreachable
Redis) the node keeps serving its last good version, records why it is behind, and
recovers from the newest snapshot when it can. An operator can pin the node to a retained
version (it stops following) or roll it back to one; unpinning resumes following.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from publisher.payload import PayloadError
from publisher.redis_store import RedisVersionStore
from serving.applier import ApplierDied
from serving.model import ModelHolder, ServingModel
from stream.schema import FeatureSchema
from trainer.config import TrainerConfig

log = logging.getLogger(__name__)

# (kind: "delta" | "snapshot", seconds, rows applied)
ApplyObserver = Callable[[str, float, int], None]
# (reason,)
ErrorObserver = Callable[[str], None]


@dataclass
class FollowerHealth:
    head: int | None = None
    last_error: str | None = None
    last_error_reason: str | None = None
    last_error_at: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    versions_applied: int = 0
    reloads: int = 0
    redis_ok: bool = False
    last_contact: float = 0.0  # when Redis last answered


class NotRetained(LookupError):
    """The version (or the snapshot and deltas that lead to it) is no longer in Redis."""


class VersionFollower:
    def __init__(self, store: RedisVersionStore, schema: FeatureSchema, trainer_config: TrainerConfig,
                 block_ms: int = 1000, on_apply: ApplyObserver | None = None,
                 on_error: ErrorObserver | None = None) -> None:
        self.store = store
        self.schema = schema
        self.trainer_config = trainer_config
        self.block_ms = block_ms
        self.holder = ModelHolder(schema, trainer_config, store.config)
        self.health = FollowerHealth()
        self.pinned: int | None = None  # a pinned node stops following until unpinned
        self._on_apply = on_apply
        self._on_error = on_error
        self._lock = threading.RLock()  # one writer at a time: the follow loop or an admin action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-follower", daemon=True)

    @property
    def current(self) -> ServingModel | None:
        return self.holder.current

    @property
    def applied_at(self) -> float:
        model = self.current
        return model.applied_at if model else 0.0

    def acquire(self) -> ServingModel | None:
        """The current version, held until `release()`; None before the first version."""
        return self.holder.acquire()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=self.block_ms / 1000 + 5)
        self.holder.close()

    # ---- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        stream_id = "0-0"
        needs_reload = True
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if needs_reload:
                    # Read the stream position first: a version published while we load is still seen.
                    stream_id = self.store.last_stream_id()
                    self._contact()
                    with self._lock:
                        self._sync(self.store.head(), reload=True)
                    needs_reload = False
                entries = self.store.wait_for_versions(stream_id, self.block_ms)
                if entries:
                    stream_id = entries[-1][0]
                # Every wake-up also reads the head: it catches an announcement the stream lost
                # (trimmed, or Redis flushed and refilled) and notices a flushed Redis.
                head = self.store.head()
                self._contact()
                with self._lock:
                    self._sync(head)
                backoff = 0.2
            except (redis.RedisError, OSError, PayloadError, ApplierDied, _Gap) as e:
                self._record_error(e)
                needs_reload = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as e:  # noqa: BLE001 - a bug must not stop the node from serving
                log.exception("version follower")
                self._record_error(e)
                needs_reload = True
                self._stop.wait(5.0)

    def _contact(self) -> None:
        self.health.redis_ok = True
        self.health.last_contact = time.time()

    def _sync(self, head: int | None, reload: bool = False) -> None:
        """Bring the node to `head` (unless pinned). Holds self._lock."""
        self.health.head = head
        if self.pinned is not None:
            return
        current = self.current
        if head is None:
            if current is not None:
                raise _Gap("flushed", f"Redis has no head version (flushed?); serving {current.version}")
            return  # nothing published yet
        if current is None or current.version > head or reload:
            self._load_newest(head)
        else:
            self._catch_up(head)
        self.health.last_error = None
        self.health.last_error_reason = None

    def _load_newest(self, head: int) -> None:
        if self.holder.lost:
            # Its helper died with the tables: a new holder takes over once it reaches the head,
            # and until then this one serves what it has.
            try:
                self._replace_holder(self._build(head))
            except NotRetained as e:
                raise _Gap("gap", str(e)) from None
            self.health.reloads += 1
            return
        current = self.current
        if current is not None and current.version == head:
            return
        snapshot = self.store.newest_snapshot(at_or_before=head)
        if snapshot is None and current is not None and current.version < head:
            # No snapshot (Redis flushed and refilled): deltas may still apply on what we hold.
            self._catch_up(head)
            return
        if snapshot is None:
            raise _Gap("gap", f"no snapshot at or before head {head}")
        if current is None or current.version < snapshot or current.version > head:
            self._load_snapshot(self.holder, snapshot)
            self.health.reloads += 1
        self._catch_up(head)

    def _catch_up(self, target: int, holder: ModelHolder | None = None) -> None:
        holder = holder or self.holder
        while holder.current is not None and holder.current.version < target:
            if self._stop.is_set():
                return
            self._apply(holder, holder.current.version + 1)

    def _apply(self, holder: ModelHolder, version: int) -> None:
        manifest = self.store.manifest(version)
        if manifest is None:
            raise _Gap("gap", f"version {version} is not in Redis")
        assert holder.current is not None
        if manifest.delta is not None and manifest.base_version == holder.current.version:
            started = time.perf_counter()
            holder.apply_delta(manifest)
            self._applied("delta", started, manifest.rows_changed + manifest.tombstones)
        elif manifest.snapshot is not None:
            self._load_snapshot(holder, version, manifest)
        else:
            raise _Gap("gap", f"version {version} applies on {manifest.base_version}, "
                              f"node has {holder.current.version}")

    def _load_snapshot(self, holder: ModelHolder, version: int, manifest=None) -> None:
        manifest = manifest or self.store.manifest(version)
        if manifest is None or manifest.snapshot is None:
            raise _Gap("gap", f"snapshot {version} is not in Redis")
        started = time.perf_counter()
        holder.load_snapshot(manifest)
        self._applied("snapshot", started, sum(manifest.live_rows.values()))

    def _applied(self, kind: str, started: float, rows: int) -> None:
        self.health.versions_applied += 1
        if self._on_apply is not None:
            self._on_apply(kind, time.perf_counter() - started, rows)
        log.debug("serving version %s (%s)", self.current.version if self.current else None, kind)

    def _record_error(self, error: Exception) -> None:
        if isinstance(error, _Gap):
            reason = error.reason
        elif isinstance(error, (redis.RedisError, OSError)):
            reason = "redis"
            self.health.redis_ok = False
        elif isinstance(error, PayloadError):
            reason = "payload"
        elif isinstance(error, ApplierDied):
            reason = "helper"
        else:
            reason = "internal"
        self.health.last_error = f"{type(error).__name__}: {error}"
        self.health.last_error_reason = reason
        self.health.last_error_at = time.time()
        self.health.errors[reason] = self.health.errors.get(reason, 0) + 1
        if self._on_error is not None:
            self._on_error(reason)
        log.warning("version follower: %s (still serving version %s)", self.health.last_error,
                    self.current.version if self.current else None)

    # ---- operator actions (admin API) ----------------------------------------------

    def retained_versions(self) -> list[int]:
        """Versions a node can be pinned to: from the oldest kept snapshot to the head."""
        snapshots = [int(v) for v in self.store.redis.zrange(self.store.key("snapshots"), 0, 0)]
        head = self.store.head()
        if not snapshots or head is None:
            return []
        return [v for v in range(snapshots[0], head + 1)]

    def pin(self, version: int | None = None, rollback: bool = False) -> ServingModel:
        """Serve `version` (the current one when None) and stop following until unpinned.
        With `rollback`, the version must not be newer than the one served."""
        with self._lock:
            current = self.current
            if version is None or (current is not None and version == current.version):
                if current is None:
                    raise NotRetained("no version is loaded yet")
                self.pinned = current.version
                return current
            if rollback and current is not None and version > current.version:
                raise ValueError(f"rollback to {version}: the node serves {current.version}, "
                                 f"a rollback goes back (pin to go forward)")
            holder = self._build(version)
            self._replace_holder(holder)
            self.pinned = version
            self.health.reloads += 1
            assert holder.current is not None
            return holder.current

    def unpin(self) -> None:
        with self._lock:
            self.pinned = None
            try:
                self._sync(self.store.head(), reload=True)
            except (redis.RedisError, OSError, PayloadError, ApplierDied, _Gap) as e:
                self._record_error(e)  # the follow loop retries

    def _build(self, version: int) -> ModelHolder:
        """A fresh holder at `version`: its newest snapshot at or before it, then deltas."""
        if self.store.manifest(version) is None:
            raise NotRetained(f"version {version} is not retained in Redis")
        snapshot = self.store.newest_snapshot(at_or_before=version)
        if snapshot is None:
            raise NotRetained(f"no snapshot at or before version {version} is retained")
        holder = ModelHolder(self.schema, self.trainer_config, self.store.config)
        try:
            self._load_snapshot(holder, snapshot)
            self._catch_up(version, holder)
        except BaseException as e:
            holder.close()
            if isinstance(e, _Gap):
                raise NotRetained(f"version {version} cannot be rebuilt: {e}") from None
            raise
        return holder

    def _replace_holder(self, holder: ModelHolder) -> None:
        old, self.holder = self.holder, holder
        old.close()  # requests already holding its version finish on it: the memory stays mapped


class _Gap(Exception):
    """The chain from the node's version to the head is broken (or Redis lost it)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
