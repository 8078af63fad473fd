"""A trainer killed with SIGKILL at random moments, against the real broker and Redis,
resumes from the newest published version: no sample is lost, none is counted twice in
the state it resumes from."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import orjson

from publisher.payload import Kind, decode
from publisher.redis_store import RedisVersionStore
from tests.test_end_to_end import START_TIMEOUT_S, criteo_like, produce, start, wait_for, write_settings


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def learned_samples(store: RedisVersionStore) -> tuple[int, int]:
    """(samples in the newest version's training state, messages its offsets cover)."""
    manifest = store.manifest(store.head())
    kind, ref = (Kind.TRAIN_DELTA, manifest.train_delta) if manifest.train_delta else (Kind.TRAIN_SNAPSHOT,
                                                                                        manifest.train_snapshot)
    arrays = decode(store.read_payload(kind, manifest.version, ref)).arrays
    return int(arrays["learner/samples_seen"]), sum(manifest.offsets.values())


def test_sigkill_at_random_moments_loses_nothing(tmp_path, kafka_config, redis_config, free_port):
    rng = random.Random(20261122)
    config = write_settings(tmp_path / "settings.yaml", kafka_config, redis_config, free_port(), free_port())
    config.write_text(config.read_text().replace("interval_s: 0.5", "interval_s: 0.3"))
    store = RedisVersionStore(redis_config)
    total = 0
    stop = threading.Event()

    def keep_producing() -> None:  # samples keep arriving while the trainer dies and comes back
        nonlocal total
        while not stop.is_set() and total < 12_000:
            chunk = criteo_like(rng, 500)
            produce(kafka_config, [orjson.dumps(s) for s in chunk])
            total += len(chunk)
            time.sleep(0.3)

    producer = threading.Thread(target=keep_producing)
    producer.start()
    kills = 0
    try:
        for incarnation in range(4):
            trainer = start(config, "train", log=tmp_path / f"trainer-{incarnation}.log")
            head_before = store.head() or 0
            wait_for(lambda: (store.head() or 0) > head_before, START_TIMEOUT_S, "a new version", [trainer])
            time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-step, mid-cut, mid-write
            helpers = children_of(trainer.pid)  # its ingest process
            trainer.send_signal(signal.SIGKILL)
            trainer.wait()
            kills += 1
            wait_for(lambda: not any(alive(p) for p in helpers), 20, "the killed trainer's children to exit")
        stop.set()
        producer.join()
        trainer = start(config, "train", log=tmp_path / "trainer-final.log")
        head_before = store.head() or 0
        # Its own version first: then it has its signal handlers, and coverage is its doing.
        wait_for(lambda: (store.head() or 0) > head_before, START_TIMEOUT_S, "the final trainer's version", [trainer])
        wait_for(lambda: learned_samples(store)[1] == total, 90, "a version covering every produced sample", [trainer])
        samples, covered = learned_samples(store)
        assert kills == 4 and covered == total
        assert samples == total, f"state learned {samples} samples of {total}: lost or counted twice"
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=60) == 0
    finally:
        stop.set()
        producer.join()
