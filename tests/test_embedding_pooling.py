"""Pooling of unique rows into bags (training and serving), and the benchmark's smoke run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from freshrec.bench import embedding as bench
from trainer.embedding import EmbeddingVariable, EmbeddingVariableConfig, EvictionConfig
from trainer.embedding.pooling import bag_sum, bag_sum_concat, unique_ids


def test_bag_sum_matches_torch_indexing_forward_and_backward() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 9, size=23)
    offsets = np.array([0, 3, 3, 10, 23])
    keys, inverse = np.unique(ids, return_inverse=True)
    rows = torch.randn(keys.size, 5, requires_grad=True)
    ref_rows = rows.detach().clone().requires_grad_()
    weight = torch.randn(4, 5)
    (bag_sum(rows, inverse, offsets) * weight).sum().backward()
    inv = torch.from_numpy(inverse)
    ref = torch.stack([ref_rows[inv[a:b]].sum(0) for a, b in zip(offsets[:-1], offsets[1:])])
    (ref * weight).sum().backward()
    torch.testing.assert_close(bag_sum(rows, inverse, offsets), ref)
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


def test_bag_sum_concat_equals_cat_of_bag_sums() -> None:
    rng = np.random.default_rng(5)
    rows = [torch.randn(6, 3, requires_grad=True), torch.randn(4, 2, requires_grad=True)]
    inverses = [rng.integers(0, 6, 7), rng.integers(0, 4, 5)]
    offsets = [None, np.array([0, 1, 1, 3, 4, 4, 5, 5])]
    weight = torch.randn(7, 5)
    (bag_sum_concat(rows, inverses, offsets) * weight).sum().backward()
    ref_rows = [r.detach().clone().requires_grad_() for r in rows]
    ref = torch.cat([bag_sum(r, i, o) for r, i, o in zip(ref_rows, inverses, offsets)], 1)
    (ref * weight).sum().backward()
    torch.testing.assert_close(bag_sum_concat(rows, inverses, offsets), ref)
    for r, q in zip(rows, ref_rows):
        torch.testing.assert_close(r.grad, q.grad)
