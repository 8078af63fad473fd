"""Pooling of unique rows into bags (training and serving), and the benchmark's smoke run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from freshrec.bench import embedding as bench
from trainer.embedding import EmbeddingVariable, EmbeddingVariableConfig, EvictionConfig
from trainer.embedding.pooling import bag_sum


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
    assert figures["rows_per_s"]["freshrec EmbeddingVariable"] > 0
    assert figures["bytes_per_live_row"] > 0 and figures["live_rows"]
