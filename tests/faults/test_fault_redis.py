"""Redis faults under a running trainer subprocess and a serving subprocess, with samples
arriving all along and /predict requests all along, on a PRIVATE redis-server:

1. slowed: CLIENT PAUSE ALL for 5 s (every command blocks);
2. unreachable: shut down (saving its data) and down for 6 s: connections refused; then
   started again from its dump;
3. restarted empty: SIGKILL and started again on the same port with nothing in it.

What must hold: the serving node answers every request from its last good version
throughout, and follows again without a restart; the trainer neither crashes nor grows
without bound, and publishing catches up; after the empty restart the publisher writes a
new snapshot by itself; at the end the newest version's state has learned every produced
sample exactly once, and the node that lived through it all scores exactly like a learner
restored from that state.
"""

from __future__ import annotations

import signal
import time

import httpx
import numpy as np
import yaml

from freshrec.settings import Settings
from publisher.redis_store import RedisVersionStore
from publisher.restore import restore_learner
from stream.sample import SampleCodec
from tests.faults.harness import (START_TIMEOUT_S, Load, Producer, covered, free_port, metric, report, rss_mb,
                                   wait_for, write_settings)
from tests.test_end_to_end import criteo_like
from tests.test_trainer_crash import learned_samples
from trainer.batch import build_batch
from trainer.learner import OnlineLearner

RECOVERY_TIMEOUT_S = 120


def test_redis_slowed_unreachable_and_restarted_empty(tmp_path, kafka_config, private_redis, processes):
    import random

    redis_config = private_redis.config()
    serving_port, metrics_port = free_port(), free_port()
    # Snapshots only at the start and when the publisher finds the chain lost: the third fault
    # must be healed by the publisher noticing, not by a snapshot that happened to be due.
    config = write_settings(tmp_path / "settings.yaml", kafka_config, redis_config, serving_port=serving_port,
                            metrics_port=metrics_port,
                            publisher={"interval_s": 0.5, "snapshot_every": 100_000, "snapshot_delta_fraction": 1e6})
    store = RedisVersionStore(redis_config)
    http_base = f"http://127.0.0.1:{serving_port}"
    probe = [{k: v for k, v in s.items() if k not in ("label", "ts")} for s in criteo_like(random.Random(7), 16)]

    with Producer(kafka_config) as producer:
        trainer = processes.start(config, "train", name="trainer")
        serving = processes.start(config, "serve", name="serving")
        watched = [trainer, serving]

        def serving_version() -> int | None:
            return httpx.get(f"{http_base}/model", timeout=5).json()["version"]

        def catch_up(target_messages: int, what: str) -> tuple[float, float]:
            """Seconds until a version covers `target_messages`, and until the node serves it."""
            started = time.monotonic()
            wait_for(lambda: covered(store) >= target_messages, RECOVERY_TIMEOUT_S, f"{what}: published", watched)
            published, version = time.monotonic() - started, store.head()
            wait_for(lambda: (serving_version() or 0) >= version, RECOVERY_TIMEOUT_S, f"{what}: served", watched)
            return published, time.monotonic() - started

        wait_for(lambda: store.head() and serving_version() == store.head(), START_TIMEOUT_S,
                 "the serving node at the trainer's first versions", watched)
        with Load(serving_port, {"examples": probe}) as load:
            # -- 1. slowed --------------------------------------------------------------------
            samples_before = metric(metrics_port, "freshrec_trainer_samples_total")
            rss_before = rss_mb(trainer.pid)
            paused_at = time.monotonic()
            with private_redis.client() as c:
                c.execute_command("CLIENT", "PAUSE", 5000, "ALL")
            rss_peak = rss_before
            while time.monotonic() - paused_at < 5.0:
                rss_peak = max(rss_peak, rss_mb(trainer.pid))
                time.sleep(0.25)
            samples_paused = metric(metrics_port, "freshrec_trainer_samples_total")
            published, served = catch_up(producer.total, "after the pause")
            report("Redis slowed (CLIENT PAUSE 5 s)",
                   f"trainer learned {samples_paused - samples_before:.0f} samples during the pause (it waits); "
                   f"RSS {rss_before:.0f} -> peak {rss_peak:.0f} MB; every sample acknowledged by the end of the "
                   f"pause published {published:.1f}s and served {served:.1f}s after it")

            # -- 2. unreachable ---------------------------------------------------------------
            samples_before = metric(metrics_port, "freshrec_trainer_samples_total")
            down_at = time.monotonic()
            private_redis.shutdown_saving()
            rss_peak = rss_before = rss_mb(trainer.pid)
            while time.monotonic() - down_at < 6.0:
                rss_peak = max(rss_peak, rss_mb(trainer.pid))
                assert trainer.poll() is None and serving.poll() is None, "a process died while Redis was away"
                time.sleep(0.25)
            samples_down = metric(metrics_port, "freshrec_trainer_samples_total")
            private_redis.start(from_dump=True)
            published, served = catch_up(producer.total, "after the outage")
            report("Redis unreachable (shut down 6 s, back from its dump)",
                   f"trainer learned {samples_down - samples_before:.0f} samples while it was away; RSS "
                   f"{rss_before:.0f} -> peak {rss_peak:.0f} MB; every sample acknowledged by then published "
                   f"{published:.1f}s and served {served:.1f}s after Redis was back")

            # -- 3. restarted empty -----------------------------------------------------------
            head_before = store.head()
            private_redis.kill()
            private_redis.start()  # same port, nothing in it
            emptied = time.monotonic()
            wait_for(lambda: store.head() is not None, RECOVERY_TIMEOUT_S, "a first version in the empty Redis",
                     watched)
            first_after = time.monotonic() - emptied
            snapshot = wait_for(store.newest_snapshot, RECOVERY_TIMEOUT_S, "the publisher to write a new snapshot",
                                watched)
            snapshot_after = time.monotonic() - emptied
            wait_for(lambda: (serving_version() or 0) >= snapshot, RECOVERY_TIMEOUT_S,
                     "the node to follow the refilled Redis", watched)
            served_after = time.monotonic() - emptied
            assert snapshot > head_before
            report("Redis restarted empty (SIGKILL, same port)",
                   f"first version in the empty Redis after {first_after:.1f}s, new snapshot (v{snapshot}) after "
                   f"{snapshot_after:.1f}s, the node serving it after {served_after:.1f}s (no restart)")

            total = producer.stop()
            catch_up(total, "the end")
        statuses = load.statuses()
        versions = [v for _, s, v in load.results if s == 200]

    # Every request was answered from a version, through all three faults.
    assert set(statuses) == {200}, f"answers other than 200: {statuses}"
    assert versions == sorted(versions), "a node never goes back to an older version on its own"
    samples, offsets = learned_samples(store)
    assert offsets == total and samples == total, f"learned {samples} of {total}"

    # The node that lived through the faults scores like the trainer's own state, restored.
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0
    final = store.head()
    wait_for(lambda: serving_version() == final, 60, "the node at the final version", [serving])
    served = httpx.post(f"{http_base}/predict", json={"examples": probe}, timeout=10).json()
    assert served["version"] == final
    settings = Settings(**yaml.safe_load(config.read_text()))
    schema = settings.feature_schema()
    learner = OnlineLearner(schema, settings.trainer)
    restored = restore_learner(store, learner, kafka_config.samples_topic)
    assert restored is not None and restored.version == final
    codec = SampleCodec(schema)
    expected = learner.predict(build_batch(schema, [codec.features(d) for d in probe]))
    np.testing.assert_allclose(np.asarray(served["scores"]), np.asarray(expected, dtype=np.float64), atol=1e-5)
    report("Redis faults, overall", f"{len(load.results)} /predict requests during the faults, all 200; "
                                    f"{total} samples produced, {samples} learned, 0 lost")
