"""The trainer SIGKILLed mid-publish: after some payload chunks of the next version are in
Redis, before its manifest and head are committed. (tests/test_trainer_crash.py kills at
random moments; this one aims at the write.)

Payloads are written in 1 kB chunks so that a version takes many commands to write; the
test watches Redis for a chunk of version head+1, freezes the trainer with SIGSTOP, checks
that the head has not moved (so the process really is between its payloads and its
commit), and SIGKILLs it. A restarted trainer resumes from the newest complete version and
rewrites the half-written one; no sample is lost or counted twice."""

from __future__ import annotations

import signal
import time

from publisher.payload import Kind
from publisher.redis_store import RedisVersionStore
from tests.faults.harness import START_TIMEOUT_S, Producer, covered, report, wait_for, write_settings
from tests.test_trainer_crash import learned_samples

KILLS = 2
ATTEMPT_S = 60


def _mid_publish(store: RedisVersionStore, trainer, deadline: float) -> int | None:
    """Freeze the trainer between a version's payload chunks and its commit; the version, or None."""
    kinds = [k.name.lower() for k in Kind]
    while time.monotonic() < deadline:
        head = store.head() or 0
        pipe = store.redis.pipeline(transaction=False)
        for kind in kinds:
            pipe.exists(store.key("payload", kind, head + 1, 0))
        pipe.get(store.key("head"))
        *found, head_now = pipe.execute()
        if any(found) and int(head_now or 0) == head:
            trainer.send_signal(signal.SIGSTOP)
            if (store.head() or 0) == head and store.manifest(head + 1) is None:
                return head + 1
            trainer.send_signal(signal.SIGCONT)  # it committed in between: not mid-publish, try again
        time.sleep(0.001)
    return None


def test_sigkill_mid_publish_resumes_from_the_newest_complete_version(tmp_path, kafka_config, redis_config,
                                                                     processes):
    config = write_settings(tmp_path / "settings.yaml", kafka_config, redis_config,
                            publisher={"interval_s": 0.3, "snapshot_every": 5, "chunk_bytes": 1024})
    store = RedisVersionStore(redis_config)
    caught = []
    with Producer(kafka_config, chunk=400, every_s=0.3, limit=15_000) as producer:
        for incarnation in range(KILLS):
            trainer = processes.start(config, "train", name=f"trainer-{incarnation}")
            head_before = store.head() or 0
            wait_for(lambda: (store.head() or 0) > head_before + 1, START_TIMEOUT_S, "new versions", [trainer])
            version = _mid_publish(store, trainer, time.monotonic() + ATTEMPT_S)
            assert version is not None, "never caught the trainer between a version's payloads and its commit"
            chunks = sum(1 for _ in store.redis.scan_iter(match=store.key("payload", "*", version, "*"), count=1000))
            trainer.send_signal(signal.SIGKILL)
            trainer.wait()
            assert store.manifest(version) is None and store.head() == version - 1
            caught.append((version, chunks))
        total = producer.stop()
    restarted = time.monotonic()
    head_before = store.head()
    trainer = processes.start(config, "train", name="trainer-final")
    # A version of its own (so SIGTERM below finds it running, its signal handler set) covering everything.
    wait_for(lambda: store.head() > head_before and covered(store) == total, 120,
             "a version covering every produced sample", [trainer])
    took = time.monotonic() - restarted
    samples, offsets = learned_samples(store)
    assert offsets == total and samples == total, f"state learned {samples} of {total}: lost or counted twice"
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0
    report("trainer SIGKILL mid-publish",
           f"caught {len(caught)}x between payloads and commit (version, chunks already written: {caught}); "
           f"restart to a version covering all {total} samples {took:.1f}s; {samples} learned, 0 lost")
