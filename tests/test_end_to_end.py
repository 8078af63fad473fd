"""The walking skeleton, end to end, with every part real: samples produced to a real
Kafka-compatible broker, the trainer and a uvicorn serving node as subprocesses, versions
through a real Redis, predictions over HTTP."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from freshrec.settings import Settings
from publisher.config import PublisherConfig
from publisher.redis_store import RedisVersionStore
from serving.config import ServingConfig
from trainer.config import TrainerConfig

START_TIMEOUT_S = 120  # a cold process imports torch and compiles the table kernels


def criteo_like(rng: random.Random, n: int) -> list[dict]:
    """Samples whose label depends on C1, so a model that learns changes its scores."""
    out = []
    for _ in range(n):
        c1 = rng.randrange(50)
        sample = {"label": int(rng.random() < (0.8 if c1 < 10 else 0.1)), "ts": time.time(),
                  **{f"I{i}": rng.randrange(100) for i in range(1, 14)},
                  **{f"C{i}": f"{rng.randrange(1000):x}" for i in range(2, 27)}, "C1": f"{c1:x}"}
        out.append(sample)
    return out


def produce(kafka_config, messages: list[bytes]) -> None:
    producer = KafkaProducer(acks="all", **kafka_config.client_kwargs())
    for m in messages:
        producer.send(kafka_config.samples_topic, m)
    producer.flush()
    producer.close()


def write_settings(path: Path, kafka_config, redis_config, port: int, metrics_port: int) -> Path:
    settings = Settings(
        kafka=kafka_config, redis=redis_config,
        trainer=TrainerConfig(batch_size=256, max_batch_wait_ms=100, metrics_port=metrics_port),
        publisher=PublisherConfig(interval_s=0.5, snapshot_every=4),
        serving=ServingConfig(port=port, follow_block_ms=200),
    )
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True)))
    return path


def start(config: Path, *command: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli", "--config", str(config), *command],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_for(condition, timeout_s: float, what: str, processes=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in processes:
            assert p.poll() is None, f"{p.args[-1]} exited with {p.returncode} while waiting for {what}"
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def dead_letters(kafka_config, expected: int) -> list:
    """Every record on the dead-letter topic, once `expected` arrived (plus any extra: there
    must be none)."""
    consumer = KafkaConsumer(**kafka_config.client_kwargs())
    partitions = [TopicPartition(kafka_config.dead_letter_topic, p)
                  for p in consumer.partitions_for_topic(kafka_config.dead_letter_topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    found = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            found += records
        if len(found) >= expected:
            found += [r for rs in consumer.poll(timeout_ms=1000).values() for r in rs]  # nothing more?
            break
    consumer.close()
    return found


@pytest.fixture
def pipeline(tmp_path, kafka_config, redis_config, free_port):
    port, metrics_port = free_port(), free_port()
    config = write_settings(tmp_path / "settings.yaml", kafka_config, redis_config, port, metrics_port)
    processes: dict[str, subprocess.Popen] = {}
    yield config, port, metrics_port, processes, tmp_path
    for p in processes.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def test_events_become_live_predictions(pipeline, kafka_config, redis_config):
    config, port, metrics_port, processes, logs = pipeline
    rng = random.Random(1)
    first = criteo_like(rng, 3000)
    bad = [b"{not json", orjson.dumps({**first[0], "label": 7}), orjson.dumps({**first[0], "I1": "x"})]
    produce(kafka_config, [orjson.dumps(s) for s in first[:1500]] + bad + [orjson.dumps(s) for s in first[1500:]])

    store = RedisVersionStore(redis_config)
    # Serving starts first: it must wait, unready, and pick up the first version when it comes.
    processes["serving"] = server = start(config, "serve", log=logs / "serving.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def readiness() -> int | None:
        try:
            return http.get("/readyz").status_code
        except httpx.HTTPError:
            return None

    assert wait_for(readiness, START_TIMEOUT_S, "the serving node to answer", [server]) == 503
    assert http.post("/predict", json={"examples": [{}]}).status_code == 503

    processes["trainer"] = trainer = start(config, "train", log=logs / "trainer.log")
    wait_for(lambda: store.head(), START_TIMEOUT_S, "a first published version", [trainer])
    wait_for(lambda: readiness() == 200, 30, "the serving node to be ready", [server])
    probe = {"examples": [{k: v for k, v in s.items() if k not in ("label", "ts")} for s in criteo_like(rng, 8)]}
    one = http.post("/predict", json=probe)
    assert one.status_code == 200, one.text
    body_one = one.json()
    assert len(body_one["scores"]) == 8 and all(0 < s < 1 for s in body_one["scores"])
    assert body_one["version"] >= 1

    # Everything produced so far is learned and published: offsets cover every message.
    total = len(first) + len(bad)
    wait_for(lambda: sum(store.manifest(store.head()).offsets.values()) == total, 60,
             "a version that covers every produced message", [trainer])

    produce(kafka_config, [orjson.dumps(s) for s in criteo_like(rng, 3000)])
    total += 3000
    wait_for(lambda: sum(store.manifest(store.head()).offsets.values()) == total, 60,
             "a version that covers the second batch", [trainer])
    head = store.head()
    wait_for(lambda: http.get("/model").json()["version"] >= head, 30, "serving to apply the head", [server])
    two = http.post("/predict", json=probe).json()
    assert two["version"] > body_one["version"]
    assert two["scores"] != body_one["scores"]

    # Ranking form: shared context plus candidates, answered from one version.
    context = {k: v for k, v in probe["examples"][0].items() if k != "C1"}
    ranked = http.post("/predict", json={"context": context, "candidates": [{"C1": "0"}, {"C1": "30"}]})
    assert ranked.status_code == 200 and len(ranked.json()["scores"]) == 2

    # Bad requests get a 4xx that says what is wrong.
    wrong = http.post("/predict", json={"examples": [{"I1": "seven"}]})
    assert wrong.status_code == 422 and "I1" in wrong.text
    assert http.post("/predict", json={"examples": [], "candidates": []}).status_code == 422

    # Malformed events went to the dead-letter topic with their reason.
    letters = dead_letters(kafka_config, expected=3)
    reasons = sorted(dict(m.headers)["reason"].decode() for m in letters)
    assert reasons == ["bad_dense", "bad_label", "malformed_json"]

    # The trainer's Prometheus metrics count what it learned and what it refused (exported once a second).
    def trainer_metrics_once_all_counted() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        return text if f"freshrec_trainer_samples_total {float(total - len(bad))}" in text else None

    metrics = wait_for(trainer_metrics_once_all_counted, 10, "the trainer's metrics to count every valid sample",
                       [trainer])
    assert 'freshrec_trainer_dead_letters_total{reason="bad_label"} 1.0' in metrics
    assert "freshrec_trainer_rows_admitted_total" in metrics and "freshrec_trainer_rows_admitted_total 0.0" not in metrics
    served = http.get("/metrics").text
    assert "freshrec_serving_freshness_seconds" in served

    # SIGTERM: the trainer publishes a final version and exits cleanly.
    before = store.head()
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0
    assert store.head() > before
