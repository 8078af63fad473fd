import numpy as np
import torch

from stream.sample import Features
from stream.schema import load_schema
from trainer.batch import build_batch
from trainer.sparse import pool


def test_shared_table_keys_are_deduplicated_and_bags_point_into_them():
    schema = load_schema("movielens")  # item_id and history share the "item" table
    features = [
        Features((30.0, 1.0), ((1,), (10,), (10, 11), (), (7,))),
        Features((40.0, 2.0), ((2,), (11,), (), (), (7,))),
    ]
    batch = build_batch(schema, features, [1, 0])
    assert list(batch.tables["item"].keys) == [10, 11]
    assert list(batch.tables["item"].counts) == [2, 2]
    history = batch.bags[2]
    assert history.offsets.tolist() == [0, 2] and history.indices.tolist() == [0, 1]

    rows = {name: torch.tensor(t.keys, dtype=torch.float32)[:, None].repeat(1, schema.table(name).dim)
            for name, t in batch.tables.items()}
    pooled = pool(batch, rows)
    assert pooled[1][:, 0].tolist() == [10.0, 11.0]  # item_id
    assert pooled[2][:, 0].tolist() == [10.5, 0.0]  # history, mean pooling; empty bag pools to zero
    assert pooled[3].shape == (2, 8)  # genres: absent everywhere
    np.testing.assert_array_equal(batch.labels.numpy(), [1.0, 0.0])


def test_a_batch_that_cannot_take_a_ring_slot_crosses_the_pipe_intact():
    """Such a chunk goes whole, as msgpack (no pickle): the batch made of what arrives has
    every feature's indices and offsets and every table's keys and counts, empty ones
    included, and the chunk keeps its offsets, watermarks and dead letters."""
    import msgspec

    from trainer.batch import BatchArrays, SparseLayout, batch_from_flat
    from trainer.source import DeadLetter, _Chunk, _chunk_from_message, _chunk_message

    schema = load_schema("movielens")
    features = [
        Features((30.0, 1.0), ((1,), (10,), (10, 11), (), (7,))),
        Features((40.0, 2.0), ((2,), (11,), (), (), (7,))),
        Features((50.0, 3.0), ((1,), (12,), (13,), (), ())),
    ]
    arrays = BatchArrays.from_batch(build_batch(schema, features, [1, 0, 1]))
    dead = [DeadLetter(b"{oops", "malformed_json", "line 1", "samples", 1, 7)]
    chunk = _Chunk(arrays.flat(), np.array([1.0, 2.0, 3.0]), np.array([5, 6, 7]), {0: 3, 1: 8}, dead, {0: 9, 1: 8})
    back = _chunk_from_message(msgspec.msgpack.decode(msgspec.msgpack.encode(_chunk_message(chunk))))
    assert back.dead == dead and back.next_offsets == {0: 3, 1: 8} and back.highwater == {0: 9, 1: 8}
    np.testing.assert_array_equal(back.event_times, chunk.event_times)
    np.testing.assert_array_equal(back.produced_ms, chunk.produced_ms)
    got = BatchArrays.from_batch(batch_from_flat(back.flat, SparseLayout.of(schema)))
    assert got.tables.keys() == arrays.tables.keys() and got.tables_of_bags == arrays.tables_of_bags
    assert got.modes == arrays.modes
    for have, want in [(got.dense, arrays.dense), (got.labels, arrays.labels)]:
        np.testing.assert_array_equal(have, want)
    for have, want in zip(got.bag_indices + got.bag_offsets, arrays.bag_indices + arrays.bag_offsets, strict=True):
        assert (have is None) == (want is None)
        np.testing.assert_array_equal(have, want)
    for name, (keys, counts) in arrays.tables.items():
        np.testing.assert_array_equal(got.tables[name][0], keys)
        np.testing.assert_array_equal(got.tables[name][1], counts)
    only_dead = _Chunk(None, np.empty(0), np.empty(0, np.int64), {1: 9}, dead, {})
    back = _chunk_from_message(msgspec.msgpack.decode(msgspec.msgpack.encode(_chunk_message(only_dead))))
    assert back.flat is None and back.dead == dead and back.next_offsets == {1: 9}


def test_the_handover_pipe_holds_a_whole_micro_batch():
    """A Criteo micro-batch of 512 encodes to ~280 KiB (when it cannot take a ring slot):
    through the default 64 KiB pipe the training process's read waited on the ingest side
    several times."""
    import fcntl
    import multiprocessing as mp

    from trainer.source import _widen_pipe

    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    try:
        _widen_pipe(reader)
        assert fcntl.fcntl(reader.fileno(), fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        reader.close()
        writer.close()


def test_training_pooling_equals_embedding_bag_forward_and_backward():
    """The training step pools every feature in one kernel pass over a flat row buffer; it
    must give what torch's embedding_bag gives over the same rows (which read-only scoring
    and serving use), values and gradients, for single- and multi-valued, sum and mean
    bags, shared tables and empty bags."""
    from trainer.config import TrainerConfig
    from trainer.sparse import SparseArch

    schema = load_schema("movielens")
    rng = np.random.default_rng(3)
    features = [Features((float(i), 1.0), ((int(rng.integers(5)),), (int(rng.integers(9)),),
                                           tuple(int(k) for k in rng.integers(0, 9, rng.integers(0, 4))),
                                           tuple(int(k) for k in rng.integers(0, 6, rng.integers(0, 3))), (7,)))
                for i in range(40)]
    batch = build_batch(schema, features, [i % 2 for i in range(40)])
    arch = SparseArch(schema, TrainerConfig().embedding)
    pooled, step = arch.train_forward(batch)
    rows = {name: arch.tables[name].lookup(t.keys).requires_grad_(True) for name, t in batch.tables.items()}
    reference = pool(batch, rows)
    weights = [torch.randn(p.shape) for p in reference]
    sum((p * w).sum() for p, w in zip(pooled, weights)).backward()
    sum((p * w).sum() for p, w in zip(reference, weights)).backward()
    for got, want in zip(pooled, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for i, name in enumerate(step.keys):  # the same sums, maybe in another order
        torch.testing.assert_close(step.rows.grad(i), rows[name].grad, rtol=1e-5, atol=1e-6)
