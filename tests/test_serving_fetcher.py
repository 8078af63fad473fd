"""The serving node's payload helper process (serving/fetcher.py) against a real Redis: the
same arrays as an in-process read, read-only; bad bytes, a lost Redis and a dead helper
each end in the error the follower recovers from."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from publisher.config import RedisConfig
from publisher.payload import Compression, Kind, Payload, PayloadError, decode, encode
from publisher.redis_store import RedisVersionStore
from serving.fetcher import FetcherDied, PayloadFetcher


def _payload() -> Payload:
    rng = np.random.default_rng(1)
    return Payload(Kind.DELTA, 5, 4, {
        "table/C1/keys": rng.integers(0, 1 << 40, 1000, dtype=np.int64),
        "table/C1/values": rng.normal(size=(1000, 16)).astype(np.float32),
        "table/C1/tombstones": np.array([], dtype=np.int64),
        "dense/w": rng.normal(size=(8, 4)).astype(np.float32),
    })


@pytest.fixture
def fetcher(redis_config):
    f = PayloadFetcher(redis_config)
    yield f
    f.close()


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD])
def test_fetched_arrays_equal_an_in_process_read_and_are_read_only(redis_config, fetcher, compression):
    store = RedisVersionStore(redis_config)
    ref = store.write_payload(Kind.DELTA, 5, encode(_payload(), compression=compression), chunk_bytes=4096)
    fetched = fetcher.fetch(Kind.DELTA, 5, ref)
    local = decode(store.read_payload(Kind.DELTA, 5, ref))
    assert (fetched.kind, fetched.version, fetched.base_version) == (Kind.DELTA, 5, 4)
    assert fetched.arrays.keys() == local.arrays.keys()
    for name, array in local.arrays.items():
        assert fetched.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(fetched.arrays[name], array)
        assert not fetched.arrays[name].flags.writeable  # a view of the helper's memory file


def test_bad_bytes_are_a_payload_error(redis_config, fetcher):
    store = RedisVersionStore(redis_config)
    ref = store.write_payload(Kind.DELTA, 5, encode(_payload()), chunk_bytes=4096)
    store.redis.setrange(store.key("payload", "delta", 5, 1), 100, b"\xff\xfe")
    with pytest.raises(PayloadError, match="does not match its manifest"):
        fetcher.fetch(Kind.DELTA, 5, ref)
    store.redis.delete(store.key("payload", "delta", 5, 0))
    with pytest.raises(PayloadError, match="missing chunks"):
        fetcher.fetch(Kind.DELTA, 5, ref)


def test_unreachable_redis_is_a_redis_error(redis_config, fetcher):
    ref = RedisVersionStore(redis_config).write_payload(Kind.DELTA, 5, encode(_payload()), chunk_bytes=4096)
    nowhere = PayloadFetcher(RedisConfig(url="redis://127.0.0.1:1/0", prefix=redis_config.prefix, model="m"))
    try:
        with pytest.raises(redis.ConnectionError):
            nowhere.fetch(Kind.DELTA, 5, ref)
    finally:
        nowhere.close()


def test_a_dead_helper_is_reported_then_restarted(redis_config, fetcher):
    ref = RedisVersionStore(redis_config).write_payload(Kind.DELTA, 5, encode(_payload()), chunk_bytes=4096)
    fetcher.fetch(Kind.DELTA, 5, ref)
    fetcher._process.kill()
    fetcher._process.wait()
    with pytest.raises(FetcherDied):
        fetcher.fetch(Kind.DELTA, 5, ref)
    assert fetcher.fetch(Kind.DELTA, 5, ref).version == 5
