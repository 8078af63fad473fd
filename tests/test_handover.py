"""The shared-memory ring that carries micro-batches from the ingest process to the trainer."""

import multiprocessing as mp
import os

import numpy as np

from stream.sample import Features
from stream.schema import load_schema
from trainer.batch import FLAT_DTYPES, BatchArrays, build_batch, sparse_layout
from trainer.handover import SlotRing

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


def _fill(path: str, n_slots: int, slot_bytes: int, lengths) -> None:
    ring = SlotRing(path, n_slots, slot_bytes)
    for slot in range(n_slots):
        lengths.put(ring.write(slot, _arrays(slot, labels=slot != 1).flat()))


def test_batches_written_by_another_process_are_read_in_place():
    ring = SlotRing.create(n_slots=3, slot_bytes=64 << 10)
    ctx = mp.get_context("spawn")
    lengths = ctx.Queue()
    child = ctx.Process(target=_fill, args=(ring.path, 3, 64 << 10, lengths))
    child.start()
    try:
        written = [lengths.get(timeout=60) for _ in range(3)]
        child.join(30)
        ring.unlink()
        assert not os.path.exists(ring.path)  # both had it mapped; the mapping outlives the name
        for slot, sizes in enumerate(written):
            views = ring.read(slot, sizes, FLAT_DTYPES)
            assert all(np.shares_memory(v, ring._buffer) for v in views if v.size)
            assert all(v.ctypes.data % 64 == 0 for v in views)  # each on its own cache lines
            assert_same(BatchArrays.from_flat(views, *sparse_layout(SCHEMA)), _arrays(slot, labels=slot != 1))
    finally:
        child.join(5)
        ring.close()


def test_arrays_too_big_for_a_slot_are_refused_and_the_slot_left_alone():
    ring = SlotRing.create(n_slots=2, slot_bytes=1024)
    try:
        ring.unlink()
        assert ring.write(0, [np.arange(8, dtype=np.int64), np.ones(3, np.float32)]) == [8, 3]
        before = ring._buffer.copy()
        assert ring.write(1, [np.arange(100, dtype=np.int64), np.ones(100, np.float32)]) is None  # 1,248 bytes padded
        np.testing.assert_array_equal(ring._buffer, before)
        first, second = ring.read(0, [8, 3], [np.int64, np.float32])
        np.testing.assert_array_equal(first, np.arange(8))
        np.testing.assert_array_equal(second, np.ones(3))
    finally:
        ring.close()
