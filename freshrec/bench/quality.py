"""Does learning online pay? Progressive AUC of the online learner against a frozen copy.

On the drifting synthetic stream (stream/synthetic.py: the hidden click model rotates with
period `--drift-period` events, and new ids keep arriving), in memory:

- the online learner scores every micro-batch, then learns from it (progressive validation);
- the frozen copy is trained the same way on the first `--freeze-at` samples, then only scores;
- the oracle is the stream's true click probability: the best AUC any model can have.

AUC is computed per tumbling window of `--window` samples. A table and a PNG plot show the
three over the stream; the last line is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import orjson

MIN_GAP = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run (seconds), for smoke tests")
    parser.add_argument("--model", default="dlrm", choices=["dlrm", "deepfm", "wide_deep", "dcn_v2"])
    parser.add_argument("--samples", type=int, default=400_000, help="stream length")
    parser.add_argument("--freeze-at", type=int, default=100_000, help="the frozen copy stops learning here")
    parser.add_argument("--drift-period", type=int, default=400_000, help="events per rotation of the click model")
    parser.add_argument("--drift-share", type=float, default=0.5, help="share of each hidden weight that drifts")
    parser.add_argument("--window", type=int, default=20_000, help="samples per AUC window")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="docs/quality.png", help="the plot ('' for none)")


def _quick(args: argparse.Namespace) -> argparse.Namespace:
    small = dict(samples=30_000, freeze_at=6_000, drift_period=30_000, window=4_000)
    return argparse.Namespace(**{**vars(args), **small})


def run(args: argparse.Namespace) -> int:
    import torch

    from stream.sample import SampleCodec
    from stream.schema import load_schema
    from stream.synthetic import SyntheticStream
    from trainer.batch import build_batch_from_columns
    from trainer.config import TrainerConfig
    from trainer.learner import OnlineLearner
    from trainer.progressive import roc_auc

    if args.quick:
        args = _quick(args)
    torch.set_num_threads(args.threads)
    schema = load_schema("criteo")
    codec = SampleCodec(schema)
    fake_time = iter(range(1_700_000_000, 1 << 62))
    stream = SyntheticStream(schema, seed=args.seed, drift_period=args.drift_period, drift_share=args.drift_share,
                             clock=lambda: float(next(fake_time)))
    config = TrainerConfig(model=args.model, batch_size=args.batch, seed=args.seed, metrics_port=0)
    online, frozen = OnlineLearner(schema, config), OnlineLearner(schema, config)

    events = stream.events()
    started = time.perf_counter()
    scores: dict[str, list[np.ndarray]] = {"online": [], "frozen": [], "oracle": []}
    labels: list[np.ndarray] = []
    done = 0
    while done < args.samples:
        chunk = [next(events) for _ in range(min(args.batch, args.samples - done))]
        decoded = codec.decode_batch([orjson.dumps(e.sample) for e in chunk])
        assert not decoded.errors, decoded.errors[:1]
        batch = build_batch_from_columns(schema, decoded)
        if done < args.freeze_at:  # the frozen copy learns the same first part, step for step
            frozen_scores = frozen.learn(batch)
        else:
            frozen_scores = frozen.predict(batch)
        scores["online"].append(online.learn(batch))
        scores["frozen"].append(frozen_scores)
        scores["oracle"].append(np.array([e.p_click for e in chunk]))
        labels.append(decoded.labels.astype(np.float64))
        done += len(chunk)
    elapsed = time.perf_counter() - started

    y = np.concatenate(labels)
    flat = {k: np.concatenate(v) for k, v in scores.items()}
    rows = []
    for start in range(0, len(y) - args.window + 1, args.window):
        end = start + args.window
        row = {"end": end, **{k: roc_auc(flat[k][start:end], y[start:end]) for k in flat}}
        rows.append(row)
    after = [r for r in rows if r["end"] - args.window >= args.freeze_at]
    mean = {k: float(np.mean([r[k] for r in after])) if after else float("nan") for k in flat}
    gap = mean["online"] - mean["frozen"]

    print(f"{args.model} on the drifting synthetic stream: {args.samples:,} samples, drift period "
          f"{args.drift_period:,}, drift share {args.drift_share}, frozen after {args.freeze_at:,}; "
          f"AUC per {args.window:,} samples ({elapsed:.1f} s)")
    print()
    print("| samples | online AUC | frozen AUC | online - frozen | oracle AUC |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = " (frozen learns)" if r["end"] <= args.freeze_at else ""
        print(f"| {r['end']:,}{mark} | {r['online']:.4f} | {r['frozen']:.4f} | {r['online'] - r['frozen']:+.4f} "
              f"| {r['oracle']:.4f} |")
    print(f"| mean after the freeze | {mean['online']:.4f} | {mean['frozen']:.4f} | {gap:+.4f} | {mean['oracle']:.4f} |")
    print()
    verdict = "PASS" if gap >= MIN_GAP else "FAIL"
    print(f"{verdict}: online beats frozen by {gap:+.4f} AUC after the freeze (required: >= {MIN_GAP})")

    if args.out:
        _plot(rows, args, mean, gap, Path(args.out))
        print(f"plot: {args.out}")
    print(json.dumps({"benchmark": "quality", "model": args.model, "samples": args.samples,
                      "freeze_at": args.freeze_at, "drift_period": args.drift_period, "drift_share": args.drift_share,
                      "window": args.window, "online_auc": round(mean["online"], 4),
                      "frozen_auc": round(mean["frozen"], 4), "oracle_auc": round(mean["oracle"], 4),
                      "gap": round(gap, 4), "pass": gap >= MIN_GAP, "plot": args.out or None,
                      "windows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}))
    return 0 if gap >= MIN_GAP else 1


def _plot(rows: list[dict], args: argparse.Namespace, mean: dict, gap: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["end"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(x, [r["oracle"] for r in rows], color="0.6", linestyle=":", label="oracle (true click probability)")
    ax.plot(x, [r["online"] for r in rows], color="tab:blue", marker="o", markersize=3, label="online (learns every batch)")
    ax.plot(x, [r["frozen"] for r in rows], color="tab:red", marker="s", markersize=3,
            label=f"frozen after {args.freeze_at:,} samples")
    ax.axvline(args.freeze_at, color="tab:red", alpha=0.3, linestyle="--")
    ax.set_xlabel("samples into the stream")
    ax.set_ylabel(f"progressive AUC (per {args.window:,} samples)")
    ax.set_title(f"{args.model}, drifting synthetic stream (period {args.drift_period:,}): "
                 f"online - frozen = {gap:+.3f} AUC after the freeze", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
