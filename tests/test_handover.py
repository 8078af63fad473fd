"""The shared-memory ring that carries micro-batches from the ingest process to the trainer."""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from stream.sample import Features
from stream.schema import load_schema
from trainer.batch import FLAT_DTYPES, BatchArrays, SparseLayout, batch_from_flat, build_batch
from trainer.handover import OBJECT, SLOT, Inbox, Outbox, SlotRing

SCHEMA = load_schema("movielens")


def _arrays(seed: int, labels: bool = True) -> BatchArrays:
    rng = np.random.default_rng(seed)
    features = [Features((float(rng.integers(100)), float(i)),
                         ((int(rng.integers(5)),), (int(rng.integers(50)),),
                          tuple(int(k) for k in rng.integers(50, size=i % 4)), (), (int(rng.integers(9)),)))
                for i in range(40)]
    return BatchArrays.from_batch(build_batch(SCHEMA, features, [i % 2 for i in range(40)] if labels else None))


def assert_same(got: BatchArrays, want: BatchArrays) -> None:
    assert list(got.tables) == list(want.tables) and got.tables_of_bags == want.tables_of_bags
    assert got.modes == want.modes
    np.testing.assert_array_equal(got.dense, want.dense)
    assert (got.labels is None) == (want.labels is None)
    if want.labels is not None:
        np.testing.assert_array_equal(got.labels, want.labels)
    for g, w in zip(got.bag_indices + got.bag_offsets, want.bag_indices + want.bag_offsets, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
    for name, (keys, counts) in want.tables.items():
        np.testing.assert_array_equal(got.tables[name][0], keys)
        np.testing.assert_array_equal(got.tables[name][1], counts)


def _fill(path: str, n_slots: int, slot_bytes: int, written) -> None:
    ring = SlotRing(path, n_slots, slot_bytes)
    for slot in range(n_slots):
        written.put(ring.write(slot, _arrays(slot, labels=slot != 1).flat()))


def test_batches_written_by_another_process_are_read_in_place():
    ring = SlotRing.create(n_slots=3, slot_bytes=64 << 10)
    ctx = mp.get_context("spawn")
    written = ctx.Queue()
    child = ctx.Process(target=_fill, args=(ring.path, 3, 64 << 10, written))
    child.start()
    try:
        assert [written.get(timeout=60) for _ in range(3)] == [True] * 3
        child.join(30)
        ring.unlink()
        assert not os.path.exists(ring.path)  # both had it mapped; the mapping outlives the name
        for slot in range(3):
            views = ring.read(slot, FLAT_DTYPES)
            assert all(np.shares_memory(v, ring._buffer) for v in views if v.size)
            assert all(v.ctypes.data % 64 == 0 for v in views)  # each on its own cache lines
            batch = batch_from_flat(views, SparseLayout.of(SCHEMA))
            assert all(np.shares_memory(b.indices, ring._buffer) for b in batch.bags if b.indices.size)  # no copies
            assert_same(BatchArrays.from_batch(batch), _arrays(slot, labels=slot != 1))
    finally:
        child.join(5)
        ring.close()


def test_arrays_too_big_for_a_slot_are_refused_and_the_slot_left_alone():
    ring = SlotRing.create(n_slots=2, slot_bytes=1024)
    try:
        ring.unlink()
        assert ring.write(0, [np.arange(8, dtype=np.int64), np.ones(3, np.float32)])
        before = ring._buffer.copy()
        # 1,312 bytes with the header and padding
        assert not ring.write(1, [np.arange(100, dtype=np.int64), np.ones(100, np.float32)])
        np.testing.assert_array_equal(ring._buffer, before)
        first, second = ring.read(0, [np.dtype(np.int64), np.dtype(np.float32)])
        np.testing.assert_array_equal(first, np.arange(8))
        np.testing.assert_array_equal(second, np.ones(3))
    finally:
        ring.close()


BIG = np.arange(400_000, dtype=np.int64)  # 3.2 MB: more than the pipe holds, so several reads


def _send(connection) -> None:
    outbox = Outbox(connection)
    outbox.send_slot(3)
    outbox.send(("ready", [0, 1]))
    outbox.send_slot(0)
    outbox.send(["chunk", BIG.tobytes()])
    outbox.send_slot(255)
    connection.close()


def test_frames_arrive_whole_and_in_order_then_end_of_file():
    ctx = mp.get_context("spawn")
    reading, writing = ctx.Pipe(duplex=False)
    inbox = Inbox(reading)
    started = time.monotonic()
    assert inbox.receive(0.2) is None  # nothing written yet: waits out the timeout
    assert time.monotonic() - started >= 0.19
    child = ctx.Process(target=_send, args=(writing,))
    child.start()
    writing.close()
    try:
        frames = [inbox.receive(60) for _ in range(5)]
        assert [kind for kind, _ in frames] == [SLOT, OBJECT, SLOT, OBJECT, SLOT]
        assert frames[0][1] == 3 and frames[1][1] == ["ready", [0, 1]] and frames[2][1] == 0
        assert frames[3][1][0] == "chunk"
        np.testing.assert_array_equal(np.frombuffer(frames[3][1][1], np.int64), BIG)
        assert frames[4][1] == 255
        with pytest.raises(EOFError):
            inbox.receive(60)
    finally:
        child.join(30)
        inbox.close()
