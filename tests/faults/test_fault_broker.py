"""The broker stopped for a while: a PRIVATE Tansu is SIGSTOPped for 10 s (it accepts nothing
and answers nothing, as a hung or partitioned broker would) and SIGCONTed, while the real
producer (`freshrec produce`) sends a bounded stream and the real trainer learns from it.
Both wait and reconnect; the producer reports every event acknowledged and none failed,
and the trainer's newest version has learned every one of them exactly once."""

from __future__ import annotations

import os
import re
import signal
import time

from publisher.config import RedisConfig
from publisher.redis_store import RedisVersionStore
from tests.faults.harness import START_TIMEOUT_S, covered, report, topics_on, wait_for, write_settings
from tests.test_trainer_crash import learned_samples

EVENTS = 20_000
STOPPED_S = 10.0


def test_broker_stopped_and_continued_loses_nothing(tmp_path, private_stack, processes):
    kafka = topics_on(private_stack.kafka_bootstrap)
    redis_config = RedisConfig(url=private_stack.redis_url, prefix="fault", model="m")
    config = write_settings(tmp_path / "settings.yaml", kafka, redis_config)
    store = RedisVersionStore(redis_config)

    trainer = processes.start(config, "train", name="trainer")
    wait_for(lambda: store.head(), START_TIMEOUT_S, "the trainer's first version", [trainer])
    producer = processes.start(config, "produce", "--count", str(EVENTS), "--rate", "1500", name="producer")
    wait_for(lambda: covered(store) > 1000, START_TIMEOUT_S, "the first samples learned", [trainer, producer])

    broker = private_stack.kafka_pid
    os.kill(broker, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while time.monotonic() - stopped_at < STOPPED_S:
            assert trainer.poll() is None, "the trainer died while the broker was stopped"
            time.sleep(0.2)
        learned_while_stopped = covered(store)
    finally:
        os.kill(broker, signal.SIGCONT)
    continued = time.monotonic()

    assert producer.wait(timeout=180) == 0, producer.log_path.read_text()[-3000:]
    producer_done = time.monotonic() - continued
    summary = producer.log_path.read_text()
    m = re.search(r"produced (\d+) events .*\((\d+) failed\)", summary)
    assert m and int(m.group(1)) == EVENTS and int(m.group(2)) == 0, summary[-2000:]
    wait_for(lambda: covered(store) == EVENTS, 180, "a version covering every event", [trainer])
    trainer_done = time.monotonic() - continued
    samples, offsets = learned_samples(store)
    assert samples == offsets == EVENTS
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0
    report(f"broker SIGSTOP {STOPPED_S:.0f} s",
           f"producer (paced at 1500/s, no burst after a stall): {EVENTS} acknowledged, 0 failed, finished "
           f"{producer_done:.1f}s after SIGCONT; trainer: every event learned {trainer_done - producer_done:.1f}s "
           f"after the producer finished ({learned_while_stopped} covered at SIGCONT); {samples} learned, 0 lost")
