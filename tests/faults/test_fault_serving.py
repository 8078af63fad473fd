"""A serving node SIGKILLed under load (closed-loop /predict requests, a trainer publishing
every 0.5 s from a live stream) and started again on the same port: it loads the newest
snapshot and the deltas after it, is ready again, and serves the head version. Never a 5xx
other than the 503 a node answers before its first version is loaded."""

from __future__ import annotations

import random
import signal
import time

import httpx

from publisher.redis_store import RedisVersionStore
from tests.faults.harness import START_TIMEOUT_S, Load, Producer, free_port, report, wait_for, write_settings
from tests.test_end_to_end import criteo_like


def test_serving_node_killed_under_load_comes_back_at_the_head(tmp_path, kafka_config, redis_config, processes):
    rng = random.Random(11)
    port = free_port()
    config = write_settings(tmp_path / "settings.yaml", kafka_config, redis_config, serving_port=port,
                            publisher={"interval_s": 0.5, "snapshot_every": 8})
    store = RedisVersionStore(redis_config)
    base = f"http://127.0.0.1:{port}"
    probe = {"examples": [{k: v for k, v in s.items() if k not in ("label", "ts")} for s in criteo_like(rng, 16)]}

    def model() -> dict:
        return httpx.get(f"{base}/model", timeout=5).json()

    def ready() -> bool:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200

    with Producer(kafka_config, chunk=200, every_s=0.25):
        trainer = processes.start(config, "train", name="trainer")
        serving = processes.start(config, "serve", name="serving-0")
        wait_for(lambda: store.head() and ready(), START_TIMEOUT_S, "a ready node", [trainer, serving])
        with Load(port, probe, pause_s=0.01) as load:
            for kill in range(1, 3):
                time.sleep(rng.uniform(1.0, 3.0))  # under load, versions landing
                serving.send_signal(signal.SIGKILL)
                serving.wait()
                killed_at = time.monotonic()
                head_at_kill = store.head()
                time.sleep(1.0)  # the load meets a closed port for a while
                serving = processes.start(config, "serve", name=f"serving-{kill}")
                restarted = time.monotonic()
                answering = wait_for(lambda: model() and time.monotonic(), START_TIMEOUT_S, "the node to answer",
                                     [trainer, serving])
                wait_for(ready, START_TIMEOUT_S, "the restarted node to be ready", [trainer, serving])
                ready_at = time.monotonic()
                head = store.head()
                wait_for(lambda: (model()["version"] or 0) >= head, 60, "the restarted node at the head",
                         [trainer, serving])
                at_head = time.monotonic()
                first_200 = next(t for t, s, _ in load.results if t > restarted and s == 200)
                report(f"serving SIGKILL #{kill} under load",
                       f"restart to HTTP up {answering - restarted:.1f}s, to ready {ready_at - restarted:.1f}s, "
                       f"to first 200 on /predict {first_200 - restarted:.1f}s, to the head (v{head}, "
                       f"{head - head_at_kill} versions published meanwhile) {at_head - restarted:.1f}s; "
                       f"down {restarted - killed_at:.1f}s by design")
            time.sleep(1.0)
        wait_for(lambda: serving.poll() is None and ready(), 30, "the node still ready", [trainer, serving])

    statuses = load.statuses()
    # None: connection refused while no node listened (the kill); 503: up, no version loaded yet.
    assert set(statuses) <= {200, 503, None}, f"unexpected answers: {statuses}"
    assert statuses[200] > 0
    versions = [v for _, s, v in load.results if s == 200]
    report("serving SIGKILL, overall", f"{len(load.results)} requests: {statuses[200]} answered 200, "
                                       f"{statuses[503]} 503 while loading, {statuses[None]} refused while down; "
                                       f"versions served {min(versions)}..{max(versions)}")
