"""The fault-injection suite's tools: a private restartable Redis, freshrec subprocesses,
a /predict load, a producer thread, and `report()` for measured recovery times (printed at
the end of the session by tests/faults/conftest.py; the README's Faults table quotes them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
import yaml

from freshrec.settings import Settings
from publisher.config import PublisherConfig, RedisConfig
from publisher.redis_store import RedisVersionStore
from serving.config import ServingConfig
from stream.config import KafkaConfig
from stream.topics import ensure_topics, samples_topics
from trainer.config import TrainerConfig

START_TIMEOUT_S = 180  # a cold process imports torch and compiles kernels, on a loaded 2-core machine
REPORTS: list[tuple[str, str]] = []


def report(fault: str, text: str) -> None:
    """A measured figure for the end-of-session summary (and the test's own output)."""
    REPORTS.append((fault, text))
    print(f"[fault] {fault}: {text}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a private Redis ---------------------------------------------------------------------------

class RedisServer:
    """A redis-server of this test's own, on a free port, that may be killed, paused and
    started again on the same port: empty, or from the dump it saved when shut down."""

    def __init__(self, workdir: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def config(self, **options) -> RedisConfig:
        return RedisConfig(**{"url": self.url, "prefix": "fault", "model": "m", **options})

    def client(self, **options) -> redis.Redis:
        return redis.Redis(**{"host": "127.0.0.1", "port": self.port, "socket_timeout": 5, **options})

    def start(self, from_dump: bool = False, ready=None) -> None:
        """Start on the same port. Without `from_dump` any previous dump is removed: empty."""
        dump = self.dir / "dump.rdb"
        if not from_dump:
            dump.unlink(missing_ok=True)
        self.starts += 1
        log = (self.dir / f"redis-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--dbfilename", "dump.rdb", *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        ready = ready or self.answers
        deadline = time.monotonic() + 20
        try:
            while not ready():
                assert self.proc.poll() is None, f"redis-server exited: {(self.dir / f'redis-{self.starts}.log').read_text()}"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        except BaseException:  # a failed start must not leave an orphan redis-server behind
            self.kill()
            raise

    def answers(self) -> bool:
        try:
            with self.client(socket_timeout=0.5) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: everything it held is gone (nothing is persisted unless shut down with a save)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def shutdown_saving(self) -> None:
        """SHUTDOWN SAVE (private instance only): its data lands in the dump, `start(from_dump=True)`
        brings it back; in between the port refuses connections."""
        with self.client() as c:
            try:
                c.shutdown(save=True)
            except redis.ConnectionError:
                pass
        self.proc.wait(timeout=20)
        self.proc = None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def topics_on(bootstrap: str, partitions: int = 2) -> KafkaConfig:
    tag = uuid.uuid4().hex[:12]
    cfg = KafkaConfig(bootstrap_servers=bootstrap, samples_topic=f"samples-{tag}",
                      dead_letter_topic=f"dead-letter-{tag}", impressions_topic=f"impressions-{tag}",
                      clicks_topic=f"clicks-{tag}", partitions=partitions)
    ensure_topics(cfg, samples_topics(cfg))
    return cfg


# -- the real processes -------------------------------------------------------------------------

def write_settings(path: Path, kafka: KafkaConfig, redis_config: RedisConfig, *, serving_port: int = 0,
                   metrics_port: int = 0, schema: str = "criteo", trainer: dict | None = None,
                   publisher: dict | None = None, serving: dict | None = None) -> Path:
    settings = Settings(
        schema=schema, kafka=kafka, redis=redis_config,
        trainer=TrainerConfig(**{"batch_size": 256, "max_batch_wait_ms": 100, "metrics_port": metrics_port,
                                 **(trainer or {})}),
        publisher=PublisherConfig(**{"interval_s": 0.5, "snapshot_every": 4, **(publisher or {})}),
        serving=ServingConfig(**{"port": serving_port or 8000, "follow_block_ms": 200, **(serving or {})}),
    )
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True)))
    return path


@dataclass
class Processes:
    """freshrec subprocesses of one test; whatever is still running at teardown is killed."""

    logs: Path
    running: list[subprocess.Popen] = field(default_factory=list)

    def start(self, config: Path, *command: str, name: str) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "freshrec.cli", "--config", str(config), *command],
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        proc.log_path = log  # type: ignore[attr-defined]
        self.running.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.running:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.kill()
                p.wait()


def wait_for(condition, timeout_s: float, what: str, processes=()):
    """Poll `condition` until it returns something truthy; fail if a watched process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in processes:
            if p.poll() is not None:
                tail = Path(p.log_path).read_text(errors="replace")[-3000:] if hasattr(p, "log_path") else ""
                raise AssertionError(f"{p.args[-1]} exited with {p.returncode} while waiting for {what}\n{tail}")
        try:
            value = condition()
        except (redis.RedisError, httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def metric(port: int, name: str, labels: str = "") -> float | None:
    """One sample of a Prometheus exposition on 127.0.0.1:port (None if absent)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.M)
    m = pattern.search(text)
    return float(m.group(1)) if m else None


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the trainer's ingest process), in MB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def covered(store: RedisVersionStore) -> int:
    """Messages the newest version's offsets cover (0 when there is none)."""
    head = store.head()
    if head is None:
        return 0
    manifest = store.manifest(head)
    return sum(manifest.offsets.values()) if manifest else 0


class Load:
    """Closed-loop /predict requests from a thread, on loopback, bounded by `stop()` and by
    `max_requests`; every answer (status, version) or connection error is recorded with its time."""

    def __init__(self, port: int, body: dict, pause_s: float = 0.02, max_requests: int = 20_000) -> None:
        import threading

        self.url = f"http://127.0.0.1:{port}/predict"
        self.body = body
        self.pause_s = pause_s
        self.max_requests = max_requests
        self.results: list[tuple[float, int | None, int | None]] = []  # (monotonic, status, version)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set() and len(self.results) < self.max_requests:
                try:
                    r = http.post(self.url, json=self.body)
                    version = r.json().get("version") if r.status_code == 200 else None
                    self.results.append((time.monotonic(), r.status_code, version))
                except httpx.HTTPError:
                    self.results.append((time.monotonic(), None, None))
                self._stop.wait(self.pause_s)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def statuses(self, start: float = 0.0, end: float = float("inf")) -> Counter:
        return Counter(s for t, s, _ in self.results if start <= t <= end)


class Producer:
    """Criteo-like samples into the samples topic from a thread, in chunks, until stopped or
    `limit` samples; `total` counts what the broker acknowledged."""

    def __init__(self, kafka: KafkaConfig, chunk: int = 300, every_s: float = 0.3, limit: int = 200_000,
                 seed: int = 1) -> None:
        import random
        import threading

        self.kafka, self.chunk, self.every_s, self.limit = kafka, chunk, every_s, limit
        self.rng = random.Random(seed)
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import orjson
        from kafka import KafkaProducer

        from tests.test_end_to_end import criteo_like

        producer = KafkaProducer(acks="all", linger_ms=5, **self.kafka.client_kwargs())
        try:
            while not self._stop.is_set() and self.total < self.limit:
                for s in criteo_like(self.rng, self.chunk):
                    producer.send(self.kafka.samples_topic, orjson.dumps(s))
                producer.flush()  # acknowledged: from here on it must not be lost
                self.total += self.chunk
                self._stop.wait(self.every_s)
        finally:
            producer.close()

    def __enter__(self) -> "Producer":
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(60)
        return self.total

    def __exit__(self, *exc) -> None:
        self.stop()
