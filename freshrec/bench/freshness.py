"""Freshness, end to end, as DESIGN.md defines it: for a sampled event produced to Kafka at
t_p (the broker's record timestamp), t_s is the first moment a serving node answers from a
version whose manifest offsets include it; freshness is t_s - t_p.

Runs the real pipeline on an embedded stack (broker, Redis, trainer and serving node as
subprocesses) at a sustained event rate, with a prober calling /predict every few ms.
Prints p50/p95/p99 beside the publish interval (the floor any periodic publisher pays:
an event waits on average half an interval for the next cut), writes a PNG of freshness
over time, and ends with one JSON line."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=5000, help="events per second")
    parser.add_argument("--duration", type=float, default=60, help="seconds of measurement")
    parser.add_argument("--interval", type=float, default=1.0, help="publish interval (s)")
    parser.add_argument("--sample-every", type=int, default=50, help="track every n-th event")
    parser.add_argument("--plot", default="docs/freshness.png")
    parser.add_argument("--quick", action="store_true", help="10 s at 1000 events/s, no plot")


@dataclass
class Tracked:
    """Sampled events per partition: offsets (ascending) and produce times (s)."""

    offsets: dict[int, list[int]] = field(default_factory=dict)
    produced: dict[int, list[float]] = field(default_factory=dict)
    served: dict[int, list[float]] = field(default_factory=dict)  # t_s, once known
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, partition: int, offset: int, produced_s: float) -> None:
        with self.lock:
            self.offsets.setdefault(partition, []).append(offset)
            self.produced.setdefault(partition, []).append(produced_s)
            self.served.setdefault(partition, []).append(float("nan"))

    def serve(self, covered: dict[int, int], at: float) -> None:
        """Every tracked event below the version's offsets is served now, if not before."""
        with self.lock:
            for partition, next_offset in covered.items():
                offsets, served = self.offsets.get(partition, []), self.served.get(partition, [])
                for i in range(bisect_right(offsets, next_offset - 1) - 1, -1, -1):
                    if not np.isnan(served[i]):
                        break
                    served[i] = at

    def freshness(self) -> tuple[np.ndarray, np.ndarray]:
        """(produce times, freshness) of the events served so far."""
        with self.lock:
            produced = np.concatenate([np.array(v) for v in self.produced.values()]) if self.produced else np.zeros(0)
            served = np.concatenate([np.array(v) for v in self.served.values()]) if self.served else np.zeros(0)
        done = ~np.isnan(served)
        return produced[done], served[done] - produced[done]


def run(args: argparse.Namespace) -> int:
    from ops.config import StackConfig
    from ops.stack import running_stack
    from stream.config import KafkaConfig
    from stream.synthetic import SyntheticStream
    from stream.topics import ensure_topics

    rate, duration = (1000.0, 10.0) if args.quick else (args.rate, args.duration)
    with tempfile.TemporaryDirectory(prefix="freshrec-freshness-") as tmp, \
            running_stack(StackConfig(kafka_port=_free_port(), redis_port=_redis_port(), run_dir=Path(tmp))) as stack:
        kafka = KafkaConfig(bootstrap_servers=stack.kafka_bootstrap, samples_topic="freshness.samples",
                            dead_letter_topic="freshness.dead-letter")
        ensure_topics(kafka, [kafka.samples_topic, kafka.dead_letter_topic], kafka.partitions)
        serving_port = _free_port()
        model = f"freshness-{uuid.uuid4().hex[:8]}"
        settings = {
            "kafka": kafka.model_dump(), "redis": {"url": stack.redis_url, "prefix": "freshrec-bench", "model": model},
            "publisher": {"interval_s": args.interval},
            "trainer": {"metrics_port": 0, "max_batch_wait_ms": 100},
            "serving": {"port": serving_port, "follow_block_ms": 200},
        }
        config_file = Path(tmp) / "settings.yaml"
        config_file.write_text(yaml.safe_dump(settings))
        children = [_spawn(config_file, "train", Path(tmp) / "trainer.log"),
                    _spawn(config_file, "serve", Path(tmp) / "serving.log")]
        try:
            tracked = Tracked()
            http = httpx.Client(base_url=f"http://127.0.0.1:{serving_port}", timeout=5)
            stream = SyntheticStream(seed=1)
            probe = {"examples": [{k: v for k, v in s.items() if k not in ("label", "ts")} for s in stream.take(1)]}
            _wait_ready(http, children)
            stop = threading.Event()
            prober = threading.Thread(target=_probe, args=(http, probe, stack.redis_url, model, tracked, stop))
            prober.start()
            sent = _produce(kafka, stream, rate, duration, args.sample_every, tracked)
            time.sleep(args.interval * 3 + 2)  # let the tail be served
            stop.set()
            prober.join()
        finally:
            for child in children:
                child.terminate()
                child.wait(timeout=60)
        _clear_redis(stack.redis_url, model)
    produced_at, freshness = tracked.freshness()
    report = _report(freshness, produced_at, sent, rate, duration, args.interval)
    if not args.quick:
        _plot(produced_at, freshness, args.interval, Path(args.plot))
        report["plot"] = args.plot
    print(orjson.dumps(report).decode())
    return 0


def _produce(kafka, stream, rate: float, duration: float, sample_every: int, tracked: Tracked) -> int:
    """The load: librdkafka's producer, so generating load steals little CPU from the pipeline
    measured (kafka-python needs about half a core for 5k events/s here)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "acks": "all", "linger.ms": 5})

    def delivered(err, msg) -> None:
        if err is None:
            tracked.add(msg.partition(), msg.offset(), msg.timestamp()[1] / 1000)

    started = time.monotonic()
    sent = 0
    block = max(1, int(rate / 50))  # pace in 20 ms blocks
    while time.monotonic() - started < duration:
        for sample in stream.take(block):
            producer.produce(kafka.samples_topic, orjson.dumps(sample),
                             on_delivery=delivered if sent % sample_every == 0 else None)
            sent += 1
        producer.poll(0)
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    producer.flush(30)
    return sent


def _probe(http: httpx.Client, probe: dict, redis_url: str, model: str, tracked: Tracked,
           stop: threading.Event) -> None:
    """Ask the node, as a user would, and credit every event its answering version covers."""
    import redis

    client = redis.Redis.from_url(redis_url)
    covered: dict[int, dict[int, int]] = {}
    while not stop.is_set():
        try:
            version = http.post("/predict", json=probe).json()["version"]
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.02)
            continue
        at = time.time()
        if version not in covered:
            raw = client.get(f"freshrec-bench:{model}:manifest:{version}")
            if raw is None:
                continue
            covered[version] = {int(p): o for p, o in orjson.loads(raw)["offsets"].items()}
        tracked.serve(covered[version], at)
        time.sleep(0.02)


def _report(freshness: np.ndarray, produced_at: np.ndarray, sent: int, rate: float, duration: float,
            interval: float) -> dict:
    p = {q: float(np.quantile(freshness, q / 100)) if len(freshness) else float("nan") for q in (50, 95, 99)}
    print(f"events produced: {sent:,} at {rate:,.0f}/s for {duration:.0f}s; tracked and served: {len(freshness):,}")
    print(f"{'':>24} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    print(f"{'freshness (s)':>24} {p[50]:>8.3f} {p[95]:>8.3f} {p[99]:>8.3f} {float(freshness.max()) if len(freshness) else float('nan'):>8.3f}")
    print(f"{'publish interval (s)':>24} {interval:>8.3f}   (a periodic publisher's floor: ~interval/2 on average)")
    return {"benchmark": "freshness", "rate": rate, "duration_s": duration, "publish_interval_s": interval,
            "events": sent, "tracked": int(len(freshness)), "p50_s": p[50], "p95_s": p[95], "p99_s": p[99],
            "max_s": float(freshness.max()) if len(freshness) else None}


def _plot(produced_at: np.ndarray, freshness: np.ndarray, interval: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    t = produced_at - produced_at.min()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.scatter(t, freshness, s=3, alpha=0.5, label="event freshness")
    ax.axhline(np.quantile(freshness, 0.99), color="red", linestyle="--", label="p99")
    ax.axhline(interval, color="gray", linestyle=":", label="publish interval")
    ax.set_xlabel("seconds since start (produce time)")
    ax.set_ylabel("produced -> served from a version with it (s)")
    ax.set_title("freshrec end-to-end freshness")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _spawn(config: Path, command: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli", "--config", str(config), command],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_ready(http: httpx.Client, children: list[subprocess.Popen], timeout_s: float = 180) -> None:
    """The serving node is ready once the trainer has published its first version."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.poll() is not None for c in children):
            raise SystemExit("a pipeline process exited during start-up (see its log)")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the pipeline did not become ready")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_port() -> int:
    from ops.stack import redis_answers

    return 6379 if redis_answers("127.0.0.1", 6379) else _free_port()


def _clear_redis(url: str, model: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"freshrec-bench:{model}:*"))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
