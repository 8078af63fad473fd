"""The trainer's ingest decode alone (no Kafka, no model): micro-batches of samples to the
model's batch, against the per-message codec (`SampleCodec.decode`, the definition of what
is accepted) on the same messages, in one run.

For each schema (`--schemas`) and sample format (`--formats`), on N seeded synthetic samples
cut into micro-batches of `--batch` messages, it times:

- per message: `decode` on each message as JSON (orjson + the Python checks of `from_dict`),
  the baseline of both formats' rows;
- decode_batch: `SampleCodec.decode_batch`, the columns the trainer reads;
- + batch: decode_batch and `BatchArrays.from_decoded` (what the ingest process does per
  micro-batch besides polling Kafka).

The variants are timed in turns, `--repeats` times, so a load change on the shared machine
hits all of them; the table shows the median rate and the range. The last line is a JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

FORMATS = ["json", "binary"]
SCHEMAS = ["criteo", "movielens"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run (seconds), for smoke tests")
    parser.add_argument("--samples", type=int, default=30_000, help="messages per schema and format")
    parser.add_argument("--batch", type=int, default=512, help="micro-batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per variant, in turns")
    parser.add_argument("--schemas", default=",".join(SCHEMAS), help="comma-separated schema names or paths")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from " + ",".join(FORMATS))
    parser.add_argument("--seed", type=int, default=7)


def _rates(variants: dict[str, Callable[[], None]], messages: int, repeats: int) -> dict[str, list[float]]:
    """Messages per second of each variant, one pass of each in turn per repeat (after one warm pass)."""
    for fn in variants.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            rates[name].append(messages / (time.perf_counter() - start))
    return rates


def run(args: argparse.Namespace) -> int:
    from stream.sample import SampleCodec
    from stream.schema import load_schema
    from stream.synthetic import SyntheticStream
    from trainer.batch import BatchArrays

    if args.quick:
        args.samples, args.repeats = min(args.samples, 3000), min(args.repeats, 2)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - set(FORMATS):
        raise SystemExit(f"formats must be from {FORMATS}")
    rows = []
    for name in [s.strip() for s in args.schemas.split(",") if s.strip()]:
        schema = load_schema(name)
        samples = SyntheticStream(schema, seed=args.seed).take(args.samples)
        for fmt in formats:
            codec = SampleCodec(schema)
            json_messages = [codec.encode(s) for s in samples]
            messages = json_messages if fmt == "json" else [codec.encode_binary(s) for s in samples]
            batches = [messages[i:i + args.batch] for i in range(0, len(messages), args.batch)]

            def per_message() -> None:
                for m in json_messages:
                    codec.decode(m)

            def decode_batch() -> None:
                for b in batches:
                    codec.decode_batch(b)

            def with_batch() -> None:
                for b in batches:
                    BatchArrays.from_decoded(schema, codec.decode_batch(b))

            rates = _rates({"per_message": per_message, "decode_batch": decode_batch, "with_batch": with_batch},
                           len(messages), args.repeats)
            row = {"schema": schema.name, "format": fmt, "bytes": round(float(np.mean([len(m) for m in messages])))}
            for variant, r in rates.items():
                row[variant] = {"median_per_s": round(float(np.median(r))), "min_per_s": round(min(r)),
                                "max_per_s": round(max(r))}
            row["ratio"] = round(float(np.median(np.array(rates["decode_batch"]) / np.array(rates["per_message"]))), 2)
            rows.append(row)
    print(f"{args.samples} synthetic samples per row, micro-batches of {args.batch}, {args.repeats} passes in turns")
    print(f"{'schema':<10} {'format':<7} {'bytes':>5}  {'per message/s':>22}  {'decode_batch/s':>24}  "
          f"{'+ batch/s':>24}  {'ratio':>5}")
    for r in rows:
        cells = [f"{r[v]['median_per_s']:>9,} ({r[v]['min_per_s'] // 1000:,}-{r[v]['max_per_s'] // 1000:,}k)"
                 for v in ("per_message", "decode_batch", "with_batch")]
        print(f"{r['schema']:<10} {r['format']:<7} {r['bytes']:>5}  {cells[0]:>22}  {cells[1]:>24}  {cells[2]:>24}  "
              f"{r['ratio']:>5}")
    print("ratio: decode_batch over per-message decode, median of the per-pass ratios")
    print(json.dumps({"benchmark": "decode", "samples": args.samples, "batch": args.batch, "rows": rows}))
    return 0
