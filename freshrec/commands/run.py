"""`freshrec run`: the whole pipeline on one machine, with live progress.

Brings up the embedded stack (Tansu broker, Redis), then a synthetic producer (a thread
here), the trainer with its publisher and a serving node (subprocesses, as they run in
production), and shows what they do. Ctrl-C stops everything it started, cleanly: the
trainer publishes a final version first.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import yaml

from freshrec.settings import Settings, load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the whole pipeline on the embedded stack, with live progress")
    p.add_argument("--rate", type=float, help="synthetic events per second (default: producer.rate)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--no-stack", action="store_true", help="use the configured Kafka and Redis; start nothing")
    p.add_argument("--via-joiner", action="store_true",
                   help="produce raw impressions and clicks, and label them with `freshrec join` (a subprocess)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ops.stack import running_stack
    from stream.topics import ensure_topics

    settings = load_settings(args.config)
    with ExitStack() as stack:
        if not args.no_stack:
            status = stack.enter_context(running_stack(settings.stack))
            settings.kafka.bootstrap_servers = status.kafka_bootstrap
            settings.redis.url = status.redis_url
            if status.started_kafka:
                _forget_previous_runs(settings)
        if not settings.trainer.metrics_port:  # the progress line reads the trainer's metrics
            settings.trainer.metrics_port = _free_port()
        kafka = settings.kafka
        ensure_topics(kafka, [kafka.samples_topic, kafka.dead_letter_topic, kafka.impressions_topic,
                              kafka.clicks_topic], kafka.partitions)
        config_file = _write_settings(settings, stack)
        stop = threading.Event()
        producer = _start_producer(settings, args.rate or settings.producer.rate, stop, args.via_joiner)
        joiner = [stack.enter_context(_child(["join"], config_file, "joiner"))] if args.via_joiner else []
        trainer = stack.enter_context(_child(["train"], config_file, "trainer"))
        server = stack.enter_context(_child(["serve"], config_file, "serving"))
        try:
            _watch(settings, [*joiner, trainer, server], args.duration)
        except KeyboardInterrupt:
            print("\nstopping ...", flush=True)
        finally:
            stop.set()
            producer.join(timeout=10)
    print("stopped cleanly", flush=True)
    return 0


def _forget_previous_runs(settings: Settings) -> None:
    """The embedded broker keeps nothing on disk: versions in Redis from an earlier run name
    offsets of a broker that is gone, so a fresh broker starts a fresh model."""
    from publisher.redis_store import RedisVersionStore

    removed = RedisVersionStore(settings.redis).clear()
    if removed:
        print(f"fresh broker: removed {removed} Redis keys of model {settings.redis.model!r} from an earlier run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings: Settings, stack: ExitStack) -> Path:
    """The children read exactly these settings (including the stack's addresses)."""
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="freshrec-run-")))
    path = directory / "settings.yaml"
    data = settings.model_dump(mode="json", by_alias=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _start_producer(settings: Settings, rate: float, stop: threading.Event, raw: bool = False) -> threading.Thread:
    from stream.producer import encode_samples, produce
    from stream.synthetic import SyntheticStream

    if raw:  # impressions and clicks for the joiner
        from freshrec.commands.produce import raw_events

        stream = raw_events(settings, None, None, click_delay_s=min(5.0, settings.joiner.window_s / 4))
    else:
        schema = settings.feature_schema()
        stream = encode_samples(schema, SyntheticStream(schema, seed=settings.producer.seed),
                                settings.producer.sample_format)
    thread = threading.Thread(target=produce, name="producer", daemon=True,
                              kwargs=dict(kafka=settings.kafka, source=stream, rate=rate, stop=stop))
    thread.start()
    return thread


class _child:
    """A freshrec subprocess that is stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, command: list[str], config_file: Path, name: str) -> None:
        self.argv = [sys.executable, "-m", "freshrec.cli", "--config", str(config_file), *command]
        self.name = name
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.argv, env=env, start_new_session=True)
        return self.process

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _watch(settings: Settings, children: list[subprocess.Popen], duration: float | None) -> None:
    trainer_url = f"http://{settings.trainer.metrics_host}:{settings.trainer.metrics_port}/metrics"
    serving_url = f"http://{settings.serving.host}:{settings.serving.port}/model"
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    rate = _Rate()
    with httpx.Client(timeout=1.0) as http:
        while duration is None or time.monotonic() - started < duration:
            for child in children:
                if child.poll() is not None:
                    raise SystemExit(f"{' '.join(child.args[-1:])} exited with code {child.returncode}")
            trainer = _trainer_metrics(http, trainer_url)
            line = _progress_line(trainer, rate(trainer), _serving_info(http, serving_url),
                                  time.monotonic() - started)
            print(("\r\x1b[2K" if interactive else "") + line, end="" if interactive else "\n", flush=True)
            time.sleep(1.0 if interactive else 5.0)
    if interactive:
        print()


def _trainer_metrics(http: httpx.Client, url: str) -> dict[str, float] | None:
    """The trainer's Prometheus samples, summed over labels (its own metrics endpoint: the
    progress line reads what operators read, and the trainer writes nothing for it)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = http.get(url).text
    except httpx.HTTPError:
        return None
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


class _Rate:
    """Samples learned per second between two looks."""

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None

    def __call__(self, trainer: dict[str, float] | None) -> float:
        if not trainer:
            return 0.0
        now, samples = time.monotonic(), trainer.get("freshrec_trainer_samples_total", 0.0)
        previous, self.last = self.last, (now, samples)
        return (samples - previous[1]) / (now - previous[0]) if previous and now > previous[0] else 0.0


def _serving_info(http: httpx.Client, url: str) -> dict | None:
    try:
        return http.get(url).json()
    except (httpx.HTTPError, ValueError):
        return None


def _metric(value: float | None) -> str:
    """AUC is undefined until both labels were seen (through the joiner, negatives come a
    window later than positives)."""
    return "  n/a " if value is None or math.isnan(value) else f"{value:.4f}"


def _progress_line(trainer: dict[str, float] | None, samples_per_s: float, serving: dict | None,
                   elapsed: float) -> str:
    parts = [f"{elapsed:6.0f}s"]
    samples = (trainer or {}).get("freshrec_trainer_samples_total", 0.0)
    if samples:
        t = trainer
        parts += [f"trained {samples:>9,.0f}", f"{samples_per_s:>7,.0f} samples/s",
                  f"AUC {_metric(t.get('freshrec_trainer_progressive_auc'))}",
                  f"logloss {_metric(t.get('freshrec_trainer_progressive_log_loss'))}",
                  f"rows {t.get('freshrec_trainer_live_rows', 0):>9,.0f}",
                  f"dead {t.get('freshrec_trainer_dead_letters_total', 0):.0f}",
                  f"published v{t.get('freshrec_publisher_version', 0):.0f}"]
    else:
        parts.append("trainer starting")
    if serving and serving.get("version") is not None:
        parts += [f"serving v{serving['version']}", f"age {serving['model_age_s']:.1f}s"]
    else:
        parts.append("serving: waiting for a version")
    return " | ".join(parts)
