"""Pooling of unique rows into bags (training and serving), and the benchmark's smoke run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freshrec.bench import embedding as bench
from trainer.embedding import EmbeddingVariable, EmbeddingVariableConfig, EvictionConfig
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.embedding.pooling import RowBuffer, bag_sum, pool_concat, unique_columns, unique_ids, unique_segments


def test_bag_sum_matches_torch_indexing_forward_and_backward() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 9, size=23)
    offsets = np.array([0, 3, 3, 10, 23])
    keys, inverse = np.unique(ids, return_inverse=True)
    rows = torch.randn(keys.size, 5, requires_grad=True)
    ref_rows = rows.detach().clone().requires_grad_()
    weight = torch.randn(4, 5)
    starts = offsets[:-1]  # bag starts, as embedding_bag takes them: the last bag ends at the last id
    (bag_sum(rows, inverse, starts) * weight).sum().backward()
    inv = torch.from_numpy(inverse)
    ref = torch.stack([ref_rows[inv[a:b]].sum(0) for a, b in zip(offsets[:-1], offsets[1:])])
    (ref * weight).sum().backward()
    torch.testing.assert_close(bag_sum(rows, inverse, starts), ref)
    torch.testing.assert_close(rows.grad, ref_rows.grad)


def test_single_valued_bags_are_rows_by_inverse() -> None:
    rows = torch.randn(4, 3)
    inverse = np.array([3, 0, 0, 2])
    torch.testing.assert_close(bag_sum(rows, inverse), rows[torch.from_numpy(inverse)])


def test_pooled_lookup_sums_rows_and_defaults() -> None:
    ev = EmbeddingVariable(EmbeddingVariableConfig(name="t", dim=2, default_value=1.0, initial_capacity=16))
    rows = ev.train_lookup(np.array([10, 20])).numpy()
    pooled = ev.pooled_lookup(np.array([10, 20, 99, 20]), np.array([0, 2, 4])).numpy()
    np.testing.assert_allclose(pooled, [rows[0] + rows[1], 1.0 + rows[1]], rtol=1e-6)


def test_slots_remembered_from_lookup_are_dropped_by_eviction() -> None:
    ev = EmbeddingVariable(EmbeddingVariableConfig(name="t", dim=2, initial_capacity=16,
                                                   eviction=EvictionConfig(steps_to_live=1)))
    keys = np.array([1, 2])
    ev.train_lookup(keys)
    ev.evict(5)  # both rows idle since step 0: gone, slots free
    ev.train_lookup(np.array([3]))  # reuses a freed slot
    before = ev.export()[1].copy()
    ev.apply_gradients(keys, np.ones((2, 2), np.float32), step=6)
    np.testing.assert_array_equal(ev.export()[1], before)


def test_benchmark_quick_run_ends_with_json(capsys) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--quick"])) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["rows_per_s"]["freshrec EmbeddingVariable, adagrad"] > 0
    assert all(b > 0 for b in figures["bytes_per_live_row"].values()) and figures["live_rows"]


def test_unique_ids_agrees_with_numpy() -> None:
    ids = np.random.default_rng(3).integers(-50, 50, size=(300, 2))
    keys, inverse, counts = unique_ids(ids)
    ref_keys, ref_counts = np.unique(ids, return_counts=True)
    order = np.argsort(keys)
    np.testing.assert_array_equal(keys[order], ref_keys)
    np.testing.assert_array_equal(counts[order], ref_counts)
    np.testing.assert_array_equal(keys[inverse], ids.reshape(-1))
    assert unique_ids(np.zeros(0, np.int64))[0].size == 0


def test_unique_columns_is_unique_ids_per_column() -> None:
    ids = np.random.default_rng(4).integers(-20, 20, size=(50, 3))
    for c, (keys, inverse, counts) in enumerate(unique_columns(ids)):
        ref = unique_ids(ids[:, c])
        for got, want in zip((keys, inverse, counts), ref):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(keys[inverse], ids[:, c])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(-5, 5), max_size=40), max_size=6))
def test_unique_segments_is_np_unique_per_segment(segments: list[list[int]]) -> None:
    """Empty segments, repeated ids and extreme int64 keys included."""
    ids = np.array([k for seg in segments for k in seg], dtype=np.int64)
    bounds = np.cumsum([0] + [len(seg) for seg in segments]).astype(np.int64)
    got = unique_segments(ids, bounds)
    assert len(got) == len(segments)
    for seg, (keys, inverse, counts) in zip(segments, got):
        seg = np.array(seg, dtype=np.int64)
        ref_keys, ref_counts = np.unique(seg, return_counts=True)
        order = np.argsort(keys)
        np.testing.assert_array_equal(keys[order], ref_keys)
        np.testing.assert_array_equal(counts[order], ref_counts)
        np.testing.assert_array_equal(keys[inverse], seg)


def test_pool_concat_matches_torch_embedding_bag() -> None:
    """Tables of different dims in one RowBuffer, two features sharing a table, single- and
    multi-valued bags, sum and mean (with an empty bag): forward and gradients as torch's
    F.embedding_bag per feature, concatenated."""
    rng = np.random.default_rng(5)
    shapes = [(6, 3), (4, 2)]
    buffer = RowBuffer(shapes)
    for t, (n, d) in enumerate(shapes):
        buffer.rows(t)[:] = rng.standard_normal((n, d))
    features = [  # (table, indices, bag starts, mean)
        (0, rng.integers(0, 6, 7), None, False),
        (1, rng.integers(0, 4, 5), np.array([0, 1, 1, 3, 4, 4, 5]), False),
        (0, rng.integers(0, 6, 9), np.array([0, 2, 2, 5, 6, 8, 8]), True),
    ]
    weight = torch.randn(7, 8)
    pooled = pool_concat(buffer.values, [buffer.bags(t, i, o, m) for t, i, o, m in features])
    (pooled * weight).sum().backward()
    tables = [torch.from_numpy(buffer.rows(t).copy()).requires_grad_() for t in range(len(shapes))]
    ref = torch.cat([
        F.embedding_bag(torch.from_numpy(i), tables[t],
                        torch.arange(i.size) if o is None else torch.from_numpy(o), mode="mean" if m else "sum")
        for t, i, o, m in features], 1)
    (ref * weight).sum().backward()
    torch.testing.assert_close(pooled, ref)
    for t in range(len(shapes)):
        torch.testing.assert_close(buffer.grad(t), tables[t].grad)


def test_pool_concat_rejects_indices_outside_the_rows() -> None:
    buffer = RowBuffer([(3, 2), (2, 2)])
    with pytest.raises(IndexError):
        pool_concat(buffer.values, [buffer.bags(0, np.array([0, 3]))])  # row 3 of a 3-row table
    with pytest.raises(IndexError):
        pool_concat(buffer.values, [buffer.bags(1, np.array([0, 1]), np.array([0, 3]))])  # a bag starts past the ids
    with pytest.raises(IndexError):
        pool_concat(buffer.values, [buffer.bags(1, np.array([0, 1]), np.array([1, 0]))])  # bag starts decrease
    with pytest.raises(ValueError):
        pool_concat(buffer.values, [buffer.bags(0, np.array([0])), buffer.bags(1, np.array([0, 1]))])


def test_train_lookup_writes_rows_into_a_given_buffer() -> None:
    ev = EmbeddingVariable(EmbeddingVariableConfig(name="t", dim=2, initial_capacity=16))
    buffer = RowBuffer([(1, 2), (3, 2)])
    rows = ev.train_lookup(np.array([4, 5, 6]), out=buffer.rows(1))
    np.testing.assert_array_equal(buffer.rows(1), ev.lookup(np.array([4, 5, 6])).numpy())
    assert rows.data_ptr() == buffer.rows(1).ctypes.data
    with pytest.raises(ValueError):
        ev.train_lookup(np.array([4, 5]), out=buffer.rows(1))
