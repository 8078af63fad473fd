"""The serving node's tables, and its double-buffered versions written by the table helper
process into shared memory (payloads from a real Redis; no HTTP)."""

import threading

import numpy as np
from hypothesis import given, settings, strategies as st

from publisher.manifest import Manifest
import pytest

from publisher.payload import Kind, Payload, PayloadError, encode
from publisher.redis_store import RedisVersionStore
from serving.applier import ApplierDied
from serving.model import Inputs, ModelHolder, SparseInput
from serving.shm import SharedArrays
from serving.table import RowTable
from stream.schema import FeatureSchema
from trainer.config import TrainerConfig


def table(keys, dim=2, default=0.0):
    keys = np.array(sorted(keys), dtype=np.int64)
    return RowTable.build(keys, np.repeat(keys[:, None].astype(np.float32), dim, axis=1), default)


def test_lookup_reads_rows_and_default_for_absent_keys():
    t = table([5, -3, 2**62], default=0.25)
    out = t.lookup(np.array([5, 7, -3, 2**62], dtype=np.int64))
    np.testing.assert_array_equal(out[:, 0], [5, 0.25, -3, np.float32(2**62)])


def test_empty_table_reads_default():
    t = RowTable(3, 1.5)
    assert (t.lookup(np.array([1, 2], dtype=np.int64)) == 1.5).all()
    assert t.lookup(np.array([], dtype=np.int64)).shape == (0, 3)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(-50, 50)), st.lists(st.tuples(st.sets(st.integers(-50, 50)), st.sets(st.integers(-50, 50))),
                                               max_size=6))
def test_apply_matches_a_dict_model(initial, deltas):
    """Tombstones first, then upserts, delta after delta: same as replaying them on a dict."""
    expected = {k: float(k) for k in initial}
    t = table(initial)
    for step, (upserts, tombstones) in enumerate(deltas):
        for k in tombstones:
            expected.pop(k, None)
        for k in upserts:
            expected[k] = k + 1000.0 * (step + 1)
        up = np.array(sorted(upserts), dtype=np.int64)
        t.apply(up, np.repeat((up + 1000.0 * (step + 1))[:, None].astype(np.float32), 2, axis=1),
                np.array(sorted(tombstones), dtype=np.int64))
    keys, rows = t.items()
    assert len(t) == len(expected)
    assert list(keys) == sorted(expected)
    assert list(rows[:, 0]) == [expected[k] for k in sorted(expected)]
    probe = np.arange(-60, 61, dtype=np.int64)
    np.testing.assert_array_equal(t.lookup(probe)[:, 1], [expected.get(int(k), 0.0) for k in probe])


@pytest.mark.parametrize("alloc", [None, SharedArrays], ids=["numpy", "shared"])
def test_heavy_churn_keeps_every_key_reachable(alloc):
    """Many inserts and deletes through growth: probe chains stay intact (backward-shift
    deletion); in shared memory, arrays grow and buckets are rehashed in place, then (past
    the reserve) into new files."""
    rng = np.random.default_rng(0)
    t = RowTable(1, -1.0, alloc=alloc and alloc())
    live: dict[int, float] = {}
    for step in range(40):
        up = rng.integers(0, 5000, 800)
        gone = rng.integers(0, 5000, 600)
        for k in gone:
            live.pop(int(k), None)
        for k in up:
            live[int(k)] = float(step)
        t.apply(up, np.full((len(up), 1), step, np.float32), gone)
    probe = np.arange(5000, dtype=np.int64)
    np.testing.assert_array_equal(t.lookup(probe)[:, 0], [live.get(int(k), -1.0) for k in probe])
    assert len(t) == len(live)


SCHEMA = FeatureSchema.from_dict({"dense": [{"name": "x"}], "sparse": [{"name": "user"}, {"name": "item"}],
                                  "tables": {"user": 4, "item": 4}})
TRAINER = TrainerConfig(bottom_mlp=[8, 4], top_mlp=[8])


class Versions:
    """Writes payloads to Redis and hands out their manifests (what the follower reads)."""

    def __init__(self, redis_config) -> None:
        self.store = RedisVersionStore(redis_config)

    def snapshot(self, version: int, rows: dict[str, dict[int, float]]) -> Manifest:
        arrays = dense_state(0.01)
        for name in ("user", "item"):
            keys = np.array(sorted(rows[name]), dtype=np.int64)
            arrays[f"table/{name}/keys"] = keys
            arrays[f"table/{name}/values"] = np.array([[rows[name][k]] * 4 for k in keys], np.float32).reshape(-1, 4)
            arrays[f"table/{name}/default"] = np.array(0.0, np.float32)
        return self.write(Payload(Kind.SNAPSHOT, version, 0, arrays))

    def delta(self, version: int, upserts: dict[int, float], tombstones=()) -> Payload:
        arrays = dense_state(0.01 * version)
        for name in ("user", "item"):
            keys = np.array(sorted(upserts), dtype=np.int64)
            arrays[f"table/{name}/keys"] = keys
            arrays[f"table/{name}/values"] = np.array([[upserts[k]] * 4 for k in keys], np.float32).reshape(-1, 4)
            arrays[f"table/{name}/tombstones"] = np.array(sorted(tombstones), np.int64)
        return Payload(Kind.DELTA, version, version - 1, arrays)

    def write(self, payload: Payload) -> Manifest:
        m = Manifest(model="m", version=payload.version, base_version=payload.base_version,
                     global_step=payload.version, topic="t", offsets={}, watermark=0.0, newest_produced_ms=0,
                     created_at=0.0)
        m.set_ref(payload.kind, self.store.write_payload(payload.kind, payload.version, encode(payload), 4096))
        return m


def dense_state(fill: float) -> dict[str, np.ndarray]:
    from trainer.models import build_model

    model = build_model(SCHEMA, TRAINER)
    return {f"dense/{k}": np.full(tuple(v.shape), fill, np.float32) for k, v in model.state_dict().items()}


@pytest.fixture
def versions(redis_config) -> Versions:
    return Versions(redis_config)


@pytest.fixture
def holder(redis_config):
    h = ModelHolder(SCHEMA, TRAINER, redis_config)
    yield h
    h.close()


def users(model, keys) -> list[float]:
    return model.lookup("user", np.array(keys))[:, 0].tolist()


def test_double_buffer_serves_each_version_whole_and_applies_every_delta_to_both_buffers(holder, versions):
    h = holder
    h.load_snapshot(versions.snapshot(1, {"user": {1: 1.0, 2: 2.0}, "item": {1: 1.0}}))
    v1 = h.current
    assert v1.acquire()  # a request in flight on version 1
    h.apply_delta(versions.write(versions.delta(2, {3: 3.0}, tombstones=[1])))
    # The request still reads version 1 exactly, while version 2 is served to new requests.
    np.testing.assert_array_equal(v1._buffer.tables["user"].lookup(np.array([1, 3]))[:, 0], [1.0, 0.0])
    assert users(h.current, [1, 3]) == [0.0, 3.0]
    # Version 3 must wait for the version-1 reader (its buffer is the one to write).
    done = threading.Event()

    def apply3():
        h.apply_delta(versions.write(versions.delta(3, {1: 10.0})))
        done.set()

    writer = threading.Thread(target=apply3)
    writer.start()
    assert not done.wait(0.2)
    v1.release()
    writer.join(5)
    assert done.is_set()
    assert not v1.acquire()  # its buffer now holds version 3: a late request takes the current one
    v3 = h.acquire()
    assert v3.version == 3
    try:
        # deltas 2 and 3 both reached this buffer: tombstone of 1 then re-admission, 2 kept, 3 added
        assert v3._buffer.tables["user"].lookup(np.array([1, 2, 3]))[:, 0].tolist() == [10.0, 2.0, 3.0]
        assert float(v3._buffer.dense_state[next(iter(v3._buffer.dense_state))].flat[0]) == pytest.approx(0.03)
    finally:
        v3.release()
    h.apply_delta(versions.write(versions.delta(4, {})))
    assert users(h.current, [1, 2, 3]) == [10.0, 2.0, 3.0]
    assert h.current.live_rows == {"user": 3, "item": 2}  # item never had key 2


def test_tables_that_grow_are_mapped_anew_in_both_buffers(holder, versions):
    """A delta far larger than the snapshot (past the tables' memory file reserve) makes the
    helper reallocate the tables of each buffer in turn; the node reads the new arrays, never
    stale ones."""
    holder.load_snapshot(versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}))
    many = {k: float(k) for k in range(2, 5000)}
    holder.apply_delta(versions.write(versions.delta(2, many)))
    holder.apply_delta(versions.write(versions.delta(3, {1: -1.0})))  # the other buffer: catches up on 2, grows
    assert users(holder.current, [1, 2, 4999, 5000]) == [-1.0, 2.0, 4999.0, 0.0]
    holder.apply_delta(versions.write(versions.delta(4, {5000: 7.0})))
    assert users(holder.current, [1, 2, 4999, 5000]) == [-1.0, 2.0, 4999.0, 7.0]
    assert holder.current.live_rows["user"] == 5000


def test_tables_that_outgrow_their_rows_grow_in_place_and_are_not_mapped_anew(holder, versions):
    """Within their memory files' reserve, tables that outgrow their rows get more in place,
    and their buckets are rehashed in place: no descriptor comes over for them, and the
    node's arrays keep their mapping (the same address, a longer shape), so it maps nothing
    anew."""
    first = {k: float(k) for k in range(1000)}  # 1250 rows and 4096 buckets each
    holder.load_snapshot(versions.snapshot(1, {"user": first, "item": first}))
    buffers = (holder._front, holder._back)
    before = {(b.id, t, name): (a.ctypes.data, a.shape) for b in buffers
              for t, arrays in b._arrays.items() for name, a in arrays.items()}
    replies = []
    apply = holder._applier.apply_delta
    holder._applier.apply_delta = lambda *args: replies.append(apply(*args)) or replies[-1]
    holder.apply_delta(versions.write(versions.delta(2, {k: float(k) for k in range(1000, 2300)})))
    holder.apply_delta(versions.write(versions.delta(3, {1: -1.0})))  # the other buffer: catches up on 2, grows
    assert [r.arrays for r in replies] == [[], []]
    assert {(b, t) for r in replies for b, t, _, _ in r.grown} == {(b.id, t) for b in buffers for t in ("user", "item")}
    for b in buffers:
        for t, arrays in b._arrays.items():
            for name, a in arrays.items():
                address, shape = before[b.id, t, name]
                assert a.ctypes.data == address and a.shape[0] > shape[0] and not a.flags.writeable
    assert users(holder.current, [1, 999, 1000, 2299, 2300]) == [-1.0, 999.0, 1000.0, 2299.0, 0.0]
    holder.apply_delta(versions.write(versions.delta(4, {2300: 7.0})))
    assert users(holder.current, [1, 2299, 2300]) == [-1.0, 2299.0, 7.0]


def test_a_reader_that_never_lets_go_gets_its_buffer_kept_and_a_new_one_is_filled(holder, versions):
    holder.DRAIN_TIMEOUT_S = 0.05
    holder.load_snapshot(versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}))
    stuck = holder.current
    assert stuck.acquire()
    holder.apply_delta(versions.write(versions.delta(2, {1: 2.0})))
    holder.apply_delta(versions.write(versions.delta(3, {2: 3.0})))  # version 1's buffer is still read
    assert stuck._buffer.tables["user"].lookup(np.array([1, 2]))[:, 0].tolist() == [1.0, 0.0]
    assert users(holder.current, [1, 2]) == [2.0, 3.0]
    stuck.release()
    holder.apply_delta(versions.write(versions.delta(4, {3: 4.0})))
    assert users(holder.current, [1, 2, 3]) == [2.0, 3.0, 4.0]


def test_a_bad_delta_changes_nothing(holder, versions):
    holder.load_snapshot(versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}))
    bad = versions.delta(2, {5: 5.0})
    bad.arrays["table/item/values"] = np.zeros((1, 3), np.float32)
    with pytest.raises(PayloadError, match="shape"):
        holder.apply_delta(versions.write(bad))
    bad = versions.delta(2, {5: 5.0})
    bad.arrays["dense/extra"] = np.zeros(1, np.float32)
    with pytest.raises(PayloadError, match="unexpected"):
        holder.apply_delta(versions.write(bad))
    assert holder.current.version == 1
    holder.apply_delta(versions.write(versions.delta(2, {5: 5.0})))
    assert users(holder.current, [1, 5]) == [1.0, 5.0]
    holder.apply_delta(versions.write(versions.delta(3, {6: 6.0})))
    assert users(holder.current, [1, 5, 6]) == [1.0, 5.0, 6.0]


def test_a_dead_helper_leaves_the_served_version_readable(holder, versions):
    holder.load_snapshot(versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}))
    holder.apply_delta(versions.write(versions.delta(2, {2: 2.0})))
    holder._applier._process.kill()
    holder._applier._process.wait()
    with pytest.raises(ApplierDied):
        holder.apply_delta(versions.write(versions.delta(3, {3: 3.0})))
    assert holder.lost
    with pytest.raises(ApplierDied):  # a new helper would have no tables: never started silently
        holder.apply_delta(versions.write(versions.delta(3, {3: 3.0})))
    assert holder.current.version == 2 and users(holder.current, [1, 2, 3]) == [1.0, 2.0, 0.0]


def test_the_helper_loads_its_first_snapshot_at_the_nodes_priority_then_yields(holder, versions):
    """A node with no version answers only 503s: its first snapshot must not wait behind
    every other process on the machine. Once it serves, the helper runs as SCHED_IDLE (and at
    nice 19)."""
    import os

    from serving.applier import NICE

    own = os.getpriority(os.PRIO_PROCESS, 0)
    with pytest.raises(PayloadError, match="no section"):  # starts the helper; loads nothing
        holder.load_snapshot(versions.write(Payload(Kind.SNAPSHOT, 1, 0, dense_state(0.01))))
    helper = holder._applier._process.pid
    assert os.getpriority(os.PRIO_PROCESS, helper) == own
    assert os.sched_getscheduler(helper) == os.sched_getscheduler(0)
    holder.load_snapshot(versions.snapshot(1, {"user": {1: 1.0}, "item": {1: 1.0}}))
    assert os.getpriority(os.PRIO_PROCESS, helper) == min(own + NICE, 19)
    assert os.sched_getscheduler(helper) == os.SCHED_IDLE  # runs only where a core is idle


def test_shared_context_bag_scores_like_per_row_bags(holder, versions):
    h = holder
    h.load_snapshot(versions.snapshot(1, {"user": {1: 0.5, 2: -0.3}, "item": {1: 1.0, 2: 0.2}}))
    import torch

    dense = torch.tensor([[0.5], [0.5], [0.5]])
    items = SparseInput(np.array([1, 2, 7]), np.array([0, 1, 2]), True)
    shared = Inputs(3, dense, (SparseInput(np.array([2])), items))
    per_row = Inputs(3, dense, (SparseInput(np.array([2, 2, 2]), np.array([0, 1, 2]), True), items))
    m = h.acquire()
    try:
        np.testing.assert_allclose(m.score(shared), m.score(per_row), rtol=0, atol=1e-6)
    finally:
        m.release()
