"""Publisher: time to cut, encode and write a version of N changed rows, and its bytes per
row against the raw payload (key + fp32 values), for each row encoding; beside the
baseline a PyTorch user writes today (torch.save of the changed rows, one Redis SET).
Also the change in serving scores each lossy encoding causes."""

from __future__ import annotations

import argparse
import io
import time
import uuid

import numpy as np
import orjson
import torch

from publisher.config import RedisConfig
from publisher.payload import Compression, Kind, Payload, RowEncoding, decode, encode
from publisher.redis_store import RedisVersionStore
from trainer.embedding import EmbeddingVariableConfig
from trainer.embedding.variable import EmbeddingVariable

DIM = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per cell")
    parser.add_argument("--quick", action="store_true", help="10k rows only, one repeat")


def run(args: argparse.Namespace) -> int:
    sizes, repeat = ([10_000], 1) if args.quick else (args.rows, args.repeat)
    store = RedisVersionStore(RedisConfig(url=args.redis_url, prefix=f"freshrec-bench-{uuid.uuid4().hex[:8]}"))
    results = []
    try:
        for n in sizes:
            table = changed_table(n)
            results.append(measure_baseline(store, table, n, repeat))
            for rows in RowEncoding:
                for compression in Compression:
                    results.append(measure(store, table, n, rows, compression, repeat))
    finally:
        keys = list(store.redis.scan_iter(match=f"{store.config.prefix}:*"))
        if keys:
            store.redis.delete(*keys)
    score_changes = score_change_by_encoding(steps=30 if args.quick else 150, probes=1000 if args.quick else 5000)
    print_table(results, score_changes)
    print(orjson.dumps({"benchmark": "publisher", "dim": DIM, "results": results,
                        "score_change": score_changes}).decode())
    return 0


def changed_table(n: int) -> EmbeddingVariable:
    """A table whose n rows all changed since the last cut (as after a busy interval)."""
    table = EmbeddingVariable(EmbeddingVariableConfig(name="t", dim=DIM, initial_capacity=n))
    keys = np.random.default_rng(n).integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    table.train_lookup(keys)
    table.apply_gradients(keys, np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32) * 0.1, step=1)
    return table


def measure(store, table, n, rows, compression, repeat) -> dict:
    best = {"cut_s": float("inf"), "encode_s": float("inf"), "write_s": float("inf")}
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        changes = table.changes_since(0)
        t1 = time.perf_counter()
        payload = Payload(Kind.DELTA, 2, 1, {"table/t/keys": changes.keys, "table/t/values": changes.values,
                                             "table/t/tombstones": changes.tombstones},
                          frozenset({"table/t/values"}))
        data = encode(payload, rows=rows, compression=compression)
        t2 = time.perf_counter()
        store.write_payload(Kind.DELTA, 2, data, chunk_bytes=8 << 20)
        t3 = time.perf_counter()
        best = {k: min(best[k], v) for k, v in (("cut_s", t1 - t0), ("encode_s", t2 - t1), ("write_s", t3 - t2))}
        size = len(data)
    assert len(decode(data).arrays["table/t/keys"]) == n
    return {"rows": n, "encoding": rows.name.lower(), "compression": compression.name.lower(), **best,
            "total_s": sum(best.values()), "bytes": size, "bytes_per_row": size / n,
            "vs_raw": size / (n * (8 + 4 * DIM))}


def measure_baseline(store, table, n, repeat) -> dict:
    """torch.save of the changed rows' keys and values, one SET: what people write today."""
    best = {"cut_s": float("inf"), "encode_s": float("inf"), "write_s": float("inf")}
    for _ in range(repeat):
        t0 = time.perf_counter()
        keys, values = table.export()
        t1 = time.perf_counter()
        buffer = io.BytesIO()
        torch.save({"keys": torch.from_numpy(keys), "values": torch.from_numpy(values)}, buffer)
        data = buffer.getvalue()
        t2 = time.perf_counter()
        store.redis.set(store.key("baseline"), data)
        t3 = time.perf_counter()
        best = {k: min(best[k], v) for k, v in (("cut_s", t1 - t0), ("encode_s", t2 - t1), ("write_s", t3 - t2))}
    return {"rows": n, "encoding": "torch.save", "compression": "none", **best, "total_s": sum(best.values()),
            "bytes": len(data), "bytes_per_row": len(data) / n, "vs_raw": len(data) / (n * (8 + 4 * DIM))}


def score_change_by_encoding(steps: int, probes: int) -> dict[str, dict[str, float]]:
    """Scores of a model trained on the synthetic stream, with its rows passed through each
    lossy encoding, against fp32: what the bytes saved cost in predictions. (Serving scores
    equal the trainer's for the same rows: tests/test_publish_and_follow.py.)"""
    from stream.sample import SampleCodec
    from stream.schema import load_schema
    from stream.synthetic import SyntheticStream
    from trainer.batch import build_batch
    from trainer.config import TrainerConfig
    from trainer.learner import OnlineLearner

    schema, config = load_schema("criteo"), TrainerConfig()
    learner, codec, stream = OnlineLearner(schema, config), SampleCodec(schema), SyntheticStream(schema, seed=5)
    for _ in range(steps):
        samples = [codec.from_dict(d) for d in stream.take(config.batch_size)]
        learner.learn(build_batch(schema, [s.features for s in samples], [s.label for s in samples]))
    probe = build_batch(schema, [codec.features(d) for d in stream.take(probes)])
    exact = learner.predict(probe)
    states = {name: t.state_dict() for name, t in learner.sparse.tables.items()}
    out = {}
    for rows in (RowEncoding.FP16, RowEncoding.INT8):
        for name, table in learner.sparse.tables.items():
            payload = Payload(Kind.DELTA, 1, 0, {"v": states[name]["values"]}, frozenset({"v"}))
            table.load_state_dict({**states[name], "values": decode(encode(payload, rows=rows)).arrays["v"]})
        diff = np.abs(learner.predict(probe) - exact)
        out[rows.name.lower()] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                                  "p99_abs": float(np.quantile(diff, 0.99))}
    return out


def print_table(results: list[dict], score_changes: dict) -> None:
    print(f"{'rows':>9} {'encoding':>10} {'compr':>5} {'cut ms':>8} {'encode ms':>9} {'write ms':>9} "
          f"{'total ms':>9} {'B/row':>7} {'vs raw':>7} {'speed vs torch.save':>19}")
    baseline = {r["rows"]: r for r in results if r["encoding"] == "torch.save"}
    for r in results:
        speedup = baseline[r["rows"]]["total_s"] / r["total_s"]
        print(f"{r['rows']:>9,} {r['encoding']:>10} {r['compression']:>5} {r['cut_s'] * 1e3:>8.1f} "
              f"{r['encode_s'] * 1e3:>9.1f} {r['write_s'] * 1e3:>9.1f} {r['total_s'] * 1e3:>9.1f} "
              f"{r['bytes_per_row']:>7.1f} {r['vs_raw']:>7.3f} {speedup:>18.2f}x")
    print("\nserving score change against fp32 (synthetic examples, trained Criteo-shaped model):")
    for name, d in score_changes.items():
        print(f"  {name}: mean |Δp| {d['mean_abs']:.2e}, p99 {d['p99_abs']:.2e}, max {d['max_abs']:.2e}")
