"""`freshrec run`: the whole pipeline on one machine, with live progress.

Brings up the embedded stack (Tansu broker, Redis), then a synthetic producer (a thread
here), the trainer with its publisher and a serving node (subprocesses, as they run in
production), and shows what they do. Ctrl-C stops everything it started, cleanly: the
trainer publishes a final version first.
"""

from __future__ import annotations

import argparse
import os
import signal
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


def _write_settings(settings: Settings, stack: ExitStack) -> Path:
    """The children read exactly these settings (including the stack's addresses)."""
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="freshrec-run-")))
    path = directory / "settings.yaml"
    data = settings.model_dump(mode="json", by_alias=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _start_producer(settings: Settings, rate: float, stop: threading.Event, raw: bool = False) -> threading.Thread:
    from stream.producer import produce
    from stream.synthetic import SyntheticStream

    if raw:  # impressions and clicks for the joiner
        from freshrec.commands.produce import raw_events

        stream = raw_events(settings, None, None, click_delay_s=min(5.0, settings.joiner.window_s / 4))
    else:
        stream = SyntheticStream(settings.feature_schema(), seed=settings.producer.seed)
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
    from freshrec.status import StatusBoard
    from publisher.redis_store import connect

    board = StatusBoard(connect(settings.redis), settings.redis)
    url = f"http://{settings.serving.host}:{settings.serving.port}/model"
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    with httpx.Client(timeout=1.0) as http:
        while duration is None or time.monotonic() - started < duration:
            for child in children:
                if child.poll() is not None:
                    raise SystemExit(f"{' '.join(child.args[-1:])} exited with code {child.returncode}")
            line = _progress_line(board.get("trainer"), _serving_info(http, url), time.monotonic() - started)
            print(("\r\x1b[2K" if interactive else "") + line, end="" if interactive else "\n", flush=True)
            time.sleep(1.0 if interactive else 5.0)
    if interactive:
        print()


def _serving_info(http: httpx.Client, url: str) -> dict | None:
    try:
        return http.get(url).json()
    except (httpx.HTTPError, ValueError):
        return None


def _metric(value: float | None) -> str:
    """AUC is undefined until both labels were seen (through the joiner, negatives come a
    window later than positives)."""
    return "  n/a " if value is None else f"{value:.4f}"


def _progress_line(trainer: dict | None, serving: dict | None, elapsed: float) -> str:
    parts = [f"{elapsed:6.0f}s"]
    if trainer:
        dead = sum(trainer["dead_letters"].values())
        parts += [f"trained {trainer['samples']:>9,}", f"{trainer['samples_per_s']:>7,.0f} samples/s",
                  f"AUC {_metric(trainer['auc'])}", f"logloss {_metric(trainer['log_loss'])}",
                  f"rows {trainer['live_rows']:>9,}", f"dead {dead}", f"published v{trainer['published_version']}"]
    else:
        parts.append("trainer starting")
    if serving and serving.get("version") is not None:
        parts += [f"serving v{serving['version']}", f"age {serving['model_age_s']:.1f}s"]
    else:
        parts.append("serving: waiting for a version")
    return " | ".join(parts)
