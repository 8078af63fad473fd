"""The table helper process (serving/applier.py) against a real Redis: what it maps into the
node is the tables it writes; bad bytes and a lost Redis are errors the follower recovers
from; a helper that dies is replaced by a new holder built from the newest snapshot."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import redis

from publisher.config import RedisConfig
from publisher.payload import Compression, Kind, encode
from serving.applier import Applier
from serving.follower import VersionFollower
from serving.shm import SharedArrays, map_read_only
from test_serving_model import SCHEMA, TRAINER, Versions, dense_state, users


def test_shared_arrays_are_the_same_pages_in_another_mapping_and_handed_over_once():
    alloc = SharedArrays()
    kept, dropped = alloc.zeros((3, 2), np.float32), alloc.zeros((5,), np.int64)
    del dropped  # allocated and dropped before the hand-over: freed then, not handed over
    (fd,) = alloc.take_new([kept])
    view = map_read_only(fd, (3, 2), np.float32)
    kept[1, 1] = 7.0
    assert view[1, 1] == 7.0 and not view.flags.writeable
    assert alloc.take_new([kept]) == [None]  # the node has it already


def test_shared_arrays_grow_in_place_within_their_reserve_and_the_other_mapping_follows():
    import mmap

    from serving.shm import RESERVE, extended

    alloc = SharedArrays()
    n = mmap.PAGESIZE // 8  # rows of 8 bytes: a page, in a file of RESERVE pages
    rows = alloc.zeros((n, 2), np.float32)
    rows[3] = 3.0
    (fd,) = alloc.take_new([rows])
    view = map_read_only(fd, (n, 2), np.float32)
    more = alloc.extend(rows, n * RESERVE)
    assert more.ctypes.data == rows.ctypes.data and more.shape == (n * RESERVE, 2)
    assert more[3].tolist() == [3.0, 3.0] and not more[n:].any()
    assert alloc.take_new([more]) == [None]  # the same array: nothing to hand over
    more[-1] = 9.0
    wide = extended(view, more.shape)  # the node's view of the grown array: same pages, no new mapping
    assert wide.ctypes.data == view.ctypes.data and wide[-1].tolist() == [9.0, 9.0] and not wide.flags.writeable
    assert alloc.extend(rows, n * RESERVE + 1) is None  # past the reserve: the table copies into a new array
    with pytest.raises(ValueError, match="does not fit"):
        extended(view, (n * RESERVE + 1, 2))


def write_chain(versions: Versions) -> None:
    store = versions.store
    snapshot = versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}})
    store.commit(snapshot)
    store.commit(versions.write(versions.delta(2, {2: 2.0})))


def test_bad_bytes_are_a_payload_error_and_change_nothing(redis_config):
    from publisher.payload import PayloadError
    from serving.model import ModelHolder

    versions = Versions(redis_config)
    holder = ModelHolder(SCHEMA, TRAINER, redis_config)
    try:
        holder.load_snapshot(versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}))
        manifest = versions.write(versions.delta(2, {2: 2.0}))
        versions.store.redis.setrange(versions.store.key("payload", "delta", 2, 0), 100, b"\xff\xfe")
        with pytest.raises(PayloadError, match="does not match its manifest"):
            holder.apply_delta(manifest)
        versions.store.redis.delete(versions.store.key("payload", "delta", 2, 0))
        with pytest.raises(PayloadError, match="missing chunks"):
            holder.apply_delta(manifest)
        assert holder.current.version == 1 and not holder.lost
        zstd = versions.delta(2, {2: 2.0})
        manifest = versions.write(zstd)
        manifest.delta = versions.store.write_payload(Kind.DELTA, 2, encode(zstd, compression=Compression.ZSTD), 4096)
        holder.apply_delta(manifest)
        assert users(holder.current, [1, 2]) == [1.0, 2.0]
    finally:
        holder.close()


def test_a_delta_that_fails_after_it_was_read_leaves_the_last_applied_one_intact(redis_config):
    """Deltas are read into two reused buffers; the delta applied last is kept (it brings the
    other table buffer up to date with the next one), so a read that fails its checksum must
    have gone into the other buffer. Here version 3 first arrives damaged, then intact: the
    buffer that still holds version 1 is brought to 2 with the kept delta, then to 3."""
    from publisher.payload import PayloadError
    from serving.model import ModelHolder

    versions = Versions(redis_config)
    holder = ModelHolder(SCHEMA, TRAINER, redis_config)
    try:
        holder.load_snapshot(versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}))
        holder.apply_delta(versions.write(versions.delta(2, {2: 2.0, 4: 4.0})))
        manifest = versions.write(versions.delta(3, {3: 3.0}, tombstones=[4]))
        key = versions.store.key("payload", "delta", 3, 0)
        intact = versions.store.redis.get(key)
        versions.store.redis.setrange(key, 100, b"\xff\xfe")
        with pytest.raises(PayloadError, match="does not match its manifest"):
            holder.apply_delta(manifest)
        versions.store.redis.set(key, intact)
        holder.apply_delta(manifest)
        assert users(holder.current, [1, 2, 3, 4]) == [1.0, 2.0, 3.0, 0.0]
        holder.apply_delta(versions.write(versions.delta(4, {5: 5.0})))  # and the next one on top
        assert users(holder.current, [1, 2, 3, 4, 5]) == [1.0, 2.0, 3.0, 0.0, 5.0]
    finally:
        holder.close()


def test_unreachable_redis_is_a_redis_error(redis_config):
    ref = Versions(redis_config).snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}).snapshot
    nowhere = Applier(RedisConfig(url="redis://127.0.0.1:1/0", prefix=redis_config.prefix, model="m"),
                      {"user": 4, "item": 4}, {k[6:]: ("<f4", v.shape) for k, v in dense_state(0.0).items()})
    try:
        with pytest.raises(redis.ConnectionError):
            nowhere.load_snapshot(1, ref, (1, 2))
        assert not nowhere.lost
    finally:
        nowhere.close()


def wait_until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_follower_whose_helper_died_rebuilds_from_the_snapshot_and_follows_on(redis_config):
    versions = Versions(redis_config)
    write_chain(versions)
    follower = VersionFollower(versions.store, SCHEMA, TRAINER, block_ms=100)
    follower.start()
    try:
        wait_until(lambda: follower.current is not None and follower.current.version == 2, "version 2")
        old_helper = follower.holder._applier._process
        old_helper.kill()
        served = follower.current
        versions.store.commit(versions.write(versions.delta(3, {3: 3.0})))
        wait_until(lambda: follower.current.version == 3, "version 3 from a new holder")
        assert follower.health.reloads == 2 and follower.health.errors == {"helper": 1}
        assert users(follower.current, [1, 2, 3]) == [1.0, 2.0, 3.0]
        assert users(served, [1, 2, 3]) == [1.0, 2.0, 0.0]  # still readable: its memory stays mapped
        assert follower.holder._applier._process.pid != old_helper.pid
    finally:
        follower.stop()
    assert follower.holder._applier._process is None  # stopped with the follower
    assert not any(name.startswith("freshrec") for name in os.listdir("/dev/shm"))
