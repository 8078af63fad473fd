"""The publisher and a serving node's follower against a real Redis (no Kafka needed):
versions in order, parity of scores, crashes mid-write, corruption, retention."""

from __future__ import annotations

import time

import numpy as np
import pytest

from publisher.config import PublisherConfig
from publisher.payload import Kind
from publisher.publisher import Publisher
from publisher.redis_store import RedisVersionStore
from serving.follower import VersionFollower
from stream.sample import SampleCodec
from stream.schema import load_schema
from stream.synthetic import SyntheticStream
from trainer.batch import build_batch
from trainer.config import TrainerConfig
from trainer.learner import OnlineLearner
from trainer.loop import Position

SCHEMA = load_schema("criteo")
CONFIG = TrainerConfig(batch_size=256)


class Harness:
    """A learner on the synthetic stream, its publisher, and a follower: one process, real Redis."""

    def __init__(self, redis_config, **publisher_options) -> None:
        self.learner = OnlineLearner(SCHEMA, CONFIG)
        self.codec = SampleCodec(SCHEMA)
        self.stream = SyntheticStream(SCHEMA, seed=3)
        self.store = RedisVersionStore(redis_config)
        options = {"interval_s": 3600, "snapshot_every": 4, **publisher_options}
        self.publisher = Publisher(self.store, PublisherConfig(**options))
        self.position = Position(topic="samples")
        self.follower = VersionFollower(RedisVersionStore(redis_config), SCHEMA, CONFIG, block_ms=100)

    def train(self, steps: int = 2) -> None:
        for _ in range(steps):
            samples = [self.codec.from_dict(d) for d in self.stream.take(CONFIG.batch_size)]
            self.learner.learn(build_batch(SCHEMA, [s.features for s in samples], [s.label for s in samples]))
            self.position.offsets = {0: self.learner.samples_seen}

    def publish(self) -> int:
        self.publisher.publish(self.learner, self.position)
        version = self.publisher.next_version - 1
        wait_until(lambda: self.publisher.stats.published_version >= version, f"version {version} durable")
        self.publisher.after_step(self.learner, self.position)  # releases the durable change log
        return version

    def probe(self, n: int = 64):
        return [self.codec.features(d) for d in SyntheticStream(SCHEMA, seed=99).take(n)]


def wait_until(condition, what: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out: {what}")


@pytest.fixture
def harness(redis_config):
    h = Harness(redis_config)
    yield h
    h.follower.stop()


def serving_version(h: Harness) -> int | None:
    return h.follower.current.version if h.follower.current else None


def test_serving_scores_equal_the_trainers_at_every_version(harness):
    h = harness
    h.follower.start()
    probe = h.probe()
    for _ in range(6):  # crosses a snapshot (every 4th) and plain deltas
        h.train()
        version = h.publish()
        wait_until(lambda: serving_version(h) == version, f"serving at {version}")
        served = h.follower.current.predict(probe)
        trained = h.learner.predict(build_batch(SCHEMA, probe))
        np.testing.assert_allclose(served, trained, rtol=0, atol=1e-5)
    assert h.follower.health.reloads == 1  # one snapshot at start, deltas after


def test_a_new_node_starts_from_the_newest_snapshot_plus_deltas(harness, redis_config):
    h = harness
    for _ in range(6):
        h.train()
        h.publish()
    late = VersionFollower(RedisVersionStore(redis_config), SCHEMA, CONFIG, block_ms=100)
    late.start()
    try:
        wait_until(lambda: late.current is not None and late.current.version == 6, "late node at head")
        assert late.health.reloads == 1 and late.health.versions_applied == 3  # snapshot 4, deltas 5 and 6
    finally:
        late.stop()


def test_a_version_half_written_by_a_crash_is_invisible(harness):
    h = harness
    h.train()
    h.publish()
    h.follower.start()
    wait_until(lambda: serving_version(h) == 1, "serving at 1")
    # A publisher that died after writing payload chunks of version 2 but before committing it.
    h.store.write_payload(Kind.DELTA, 2, b"partial", chunk_bytes=4)
    assert h.store.head() == 1 and h.store.manifest(2) is None
    time.sleep(0.3)
    assert serving_version(h) == 1 and h.follower.health.last_error is None


def test_a_corrupt_delta_keeps_the_last_good_version_until_a_snapshot_heals(harness):
    h = harness
    h.train()
    h.publish()
    h.follower.start()
    wait_until(lambda: serving_version(h) == 1, "serving at 1")
    h.follower.stop()  # hold the node while the next delta is corrupted in Redis
    h.train()
    version = h.publish()
    key = h.store.key("payload", "delta", version, 0)
    h.store.redis.setrange(key, 60, b"\xff\xfe")
    h.follower = VersionFollower(h.store, SCHEMA, CONFIG, block_ms=100)
    h.follower.start()
    # A fresh node loads snapshot 1 and then fails on the corrupt delta 2: it serves 1 and says why.
    wait_until(lambda: h.follower.health.last_error is not None, "the corruption to be noticed")
    assert serving_version(h) == 1
    assert "does not match its manifest" in h.follower.health.last_error
    for _ in range(2):  # versions 3 and 4; 4 carries a snapshot
        h.train()
        h.publish()
    wait_until(lambda: serving_version(h) == 4, "recovery from snapshot 4")


def test_retention_keeps_the_newest_snapshots_and_what_follows_them(redis_config):
    h = Harness(redis_config, snapshot_every=2, keep_snapshots=2)
    for _ in range(9):
        h.train(steps=1)
        h.publish()
    # snapshots at 1, 2, 4, 6, 8: keep 6 and 8, and every version from 6 on
    assert [int(v) for v in h.store.redis.zrange(h.store.key("snapshots"), 0, -1)] == [6, 8]
    assert all(h.store.manifest(v) is None for v in range(1, 6))
    assert all(h.store.manifest(v) is not None for v in range(6, 10))
    leftover = [k for k in h.store.redis.scan_iter(match=h.store.key("payload", "*", "[1-5]", "*"))]
    assert leftover == []


def test_redis_flushed_serving_keeps_answering_and_new_nodes_recover_from_the_next_snapshot(redis_config):
    """Redis loses everything (flush, restart empty). A running node keeps answering (deltas
    still apply on the version it holds); the publisher notices the lost chain and publishes
    a snapshot, from which a node started afterwards loads, with no restart of anything."""
    h = Harness(redis_config, snapshot_every=1000, snapshot_delta_fraction=1000)
    h.follower.start()
    for _ in range(3):
        h.train()
        version = h.publish()
    wait_until(lambda: serving_version(h) == version, "serving at head")
    keys = list(h.store.redis.scan_iter(match=h.store.key("*")))
    h.store.redis.delete(*keys)  # this model's whole state, as FLUSHALL would (on a shared Redis)
    h.train()
    lost = h.publish()  # a delta on a base only the running node still has
    assert h.store.manifest(lost).snapshot is None
    wait_until(lambda: serving_version(h) == lost, "the running node to apply it on the version it holds")
    newcomer = VersionFollower(RedisVersionStore(redis_config), SCHEMA, CONFIG, block_ms=100)
    newcomer.start()
    try:
        wait_until(lambda: newcomer.health.last_error is not None, "the new node to find no snapshot")
        assert newcomer.current is None
        h.train()
        healed = h.publish()
        assert h.store.manifest(healed).snapshot is not None  # the publisher noticed the lost chain
        wait_until(lambda: newcomer.current is not None and newcomer.current.version == healed,
                   "the new node to load the snapshot")
        wait_until(lambda: serving_version(h) == healed, "the running node to follow")
    finally:
        newcomer.stop()
        h.follower.stop()
