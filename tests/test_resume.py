"""Exact resume: a learner restored from published versions (train snapshot + train deltas)
is the learner that published them, and keeps training identically."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from publisher.config import PublisherConfig
from publisher.publisher import Publisher
from publisher.redis_store import RedisVersionStore
from publisher.restore import restore_learner
from stream.sample import SampleCodec
from stream.schema import load_schema
from stream.synthetic import SyntheticStream
from trainer.batch import build_batch
from trainer.config import EmbeddingDefaults, TrainerConfig
from trainer.embedding import EvictionConfig
from trainer.learner import OnlineLearner
from trainer.loop import Position

SCHEMA = load_schema("criteo")


def config(evict: bool) -> TrainerConfig:
    eviction = EvictionConfig(steps_to_live=3, every_n_steps=2) if evict else EvictionConfig()
    return TrainerConfig(batch_size=128, embedding=EmbeddingDefaults(eviction=eviction))


def batches(n: int, seed: int = 11):
    codec, stream = SampleCodec(SCHEMA), SyntheticStream(SCHEMA, seed=seed)
    for _ in range(n):
        samples = [codec.from_dict(d) for d in stream.take(128)]
        yield build_batch(SCHEMA, [s.features for s in samples], [s.label for s in samples])


def publish_and_wait(publisher: Publisher, learner: OnlineLearner, position: Position) -> None:
    publisher.publish(learner, position)
    target = publisher.next_version - 1
    deadline = time.monotonic() + 20
    while publisher.stats.published_version < target:
        assert time.monotonic() < deadline, "publish timed out"
        time.sleep(0.01)
    publisher.after_step(learner, position)  # release durable change logs, as the loop does


def assert_same_learner(a: OnlineLearner, b: OnlineLearner) -> None:
    assert (a.global_step, a.samples_seen) == (b.global_step, b.samples_seen)
    for name in a.sparse.tables:
        sa, sb = a.sparse.tables[name].state_dict(), b.sparse.tables[name].state_dict()
        order_a, order_b = np.argsort(sa["keys"]), np.argsort(sb["keys"])
        np.testing.assert_array_equal(sa["keys"][order_a], sb["keys"][order_b])
        for field in ("values", "last_step", *[k for k in sa if k.startswith("optimizer.") and sa[k].ndim]):
            np.testing.assert_array_equal(sa[field][order_a], sb[field][order_b], err_msg=f"{name}.{field}")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=ka)
    for (_, sa), (_, sb) in zip(a.dense_optimizer.state_dict()["state"].items(),
                                b.dense_optimizer.state_dict()["state"].items()):
        for key in sa:
            torch.testing.assert_close(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]), rtol=0, atol=0)


@pytest.mark.parametrize("evict", [False, True], ids=["plain", "with-eviction"])
def test_restored_learner_equals_the_publisher_and_trains_identically(redis_config, evict):
    cfg = config(evict)
    original = OnlineLearner(SCHEMA, cfg)
    store = RedisVersionStore(redis_config)
    publisher = Publisher(store, PublisherConfig(interval_s=3600, snapshot_every=3))
    position = Position(topic="samples")
    stream = list(batches(15))
    for i, batch in enumerate(stream[:14]):
        original.learn(batch)
        position.offsets = {0: original.samples_seen}
        if i % 2 == 1:
            publish_and_wait(publisher, original, position)  # versions 1..7; snapshots at 1, 3, 6
    original.learn(stream[14])  # learned after the newest version: lost in a crash, learned again
    assert store.head() == 7
    tombstones = sum(store.manifest(v).tombstones for v in range(3, 8))  # 1 and 2 retired by retention
    assert (tombstones > 0) == evict

    restored = OnlineLearner(SCHEMA, cfg)
    result = restore_learner(store, restored, "samples")
    assert result is not None and result.version == 7
    assert result.position.offsets == {0: 14 * 128}
    restored.learn(stream[14])
    assert_same_learner(original, restored)
    for batch in batches(4, seed=12):
        original.learn(batch)
        restored.learn(batch)
    assert_same_learner(original, restored)
    publisher.close(original, position)


def test_nothing_to_resume(redis_config):
    assert restore_learner(RedisVersionStore(redis_config), OnlineLearner(SCHEMA, config(False)), "samples") is None


def test_resume_refuses_another_topic(redis_config):
    learner = OnlineLearner(SCHEMA, config(False))
    store = RedisVersionStore(redis_config)
    publisher = Publisher(store, PublisherConfig(interval_s=3600))
    learner.learn(next(batches(1)))
    publish_and_wait(publisher, learner, Position(topic="samples"))
    assert restore_learner(store, OnlineLearner(SCHEMA, config(False)), "other-topic") is None
    publisher.close(learner, Position(topic="samples"))
