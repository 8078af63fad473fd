"""Serving nodes over real HTTP (uvicorn on a loopback port, in a thread) against a real Redis:
parity with the trainer through /predict, ranking, tombstones, readiness and lag, a gap, a
flushed Redis, the admin API, several nodes; request validation with TestClient."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from publisher.config import PublisherConfig, RedisConfig
from publisher.manifest import Manifest
from publisher.payload import Kind, Payload, encode
from publisher.publisher import Publisher
from publisher.redis_store import RedisVersionStore
from serving.app import create_app
from serving.config import ServingConfig
from stream.sample import SampleCodec
from stream.schema import FeatureSchema, load_schema
from stream.synthetic import SyntheticStream
from trainer.batch import build_batch
from trainer.config import TrainerConfig
from trainer.learner import OnlineLearner
from trainer.loop import Position
from trainer.models import build_model

SCHEMA = load_schema("criteo")
CONFIG = TrainerConfig(batch_size=256)
LABEL_AND_TIME = ("label", "ts")


def wait_until(condition, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out: {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    """A learner on the synthetic stream and its publisher (one process, real Redis)."""

    def __init__(self, redis_config: RedisConfig, **options) -> None:
        self.learner = OnlineLearner(SCHEMA, CONFIG)
        self.codec = SampleCodec(SCHEMA)
        self.stream = SyntheticStream(SCHEMA, seed=3)
        self.store = RedisVersionStore(redis_config)
        self.publisher = Publisher(self.store, PublisherConfig(**{"interval_s": 3600, "snapshot_every": 4, **options}))
        self.position = Position(topic="samples")

    def step(self, steps: int = 1) -> int:
        for _ in range(steps):
            samples = [self.codec.from_dict(d) for d in self.stream.take(CONFIG.batch_size)]
            self.learner.learn(build_batch(SCHEMA, [s.features for s in samples], [s.label for s in samples]))
            self.position.offsets = {0: self.learner.samples_seen}
            self.position.watermark = max(s.event_time for s in samples)
        self.publisher.publish(self.learner, self.position)
        version = self.publisher.next_version - 1
        wait_until(lambda: self.publisher.stats.published_version >= version, f"version {version} durable")
        self.publisher.after_step(self.learner, self.position)
        return version


class Node:
    """A serving node: the real app under uvicorn on a free loopback port, in a thread."""

    def __init__(self, redis_config: RedisConfig, schema: FeatureSchema = SCHEMA, **serving) -> None:
        self.port = free_port()
        config = ServingConfig(port=self.port, follow_block_ms=100, **serving)
        self.app = create_app(schema, CONFIG, redis_config, config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def __enter__(self) -> "Node":
        self.thread.start()
        wait_until(lambda: self.server.started, "uvicorn to start", 120)
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def follower(self):
        return self.app.state.follower

    def version(self) -> int | None:
        return self.http.get("/model").json()["version"]

    def wait_version(self, version: int) -> None:
        wait_until(lambda: self.version() == version, f"node serving {version}")

    def metric(self, name: str) -> float | None:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None


def probe_dicts(n: int = 32, seed: int = 99) -> list[dict]:
    return [{k: v for k, v in d.items() if k not in LABEL_AND_TIME} for d in SyntheticStream(SCHEMA, seed=seed).take(n)]


def trainer_scores(t: Trainer, dicts: list[dict]) -> np.ndarray:
    return t.learner.predict(build_batch(SCHEMA, [t.codec.features(d) for d in dicts]))


# ---- behaviours over HTTP, against Redis ----------------------------------------------


def test_predict_equals_the_trainer_and_ranking_equals_examples(redis_config):
    trainer = Trainer(redis_config)
    with Node(redis_config) as node:
        assert node.http.get("/readyz").status_code == 503  # nothing published yet
        assert node.http.post("/predict", json={"examples": [{}]}).status_code == 503
        dicts = probe_dicts()
        for _ in range(5):  # a snapshot, deltas, and the delta + snapshot of version 4
            version = trainer.step(2)
            node.wait_version(version)
            r = node.http.post("/predict", json={"examples": dicts})
            assert r.status_code == 200, r.text
            body = r.json()
            manifest = trainer.store.manifest(version)
            assert body["version"] == version and r.headers["x-model-version"] == str(version)
            assert body["global_step"] == manifest.global_step and body["watermark"] == manifest.watermark
            np.testing.assert_allclose(body["scores"], trainer_scores(trainer, dicts), rtol=0, atol=1e-5)

        # Ranking: the context's fields are shared, each candidate's own fields win.
        context = {k: v for k, v in dicts[0].items() if k not in ("C1", "C2")}
        candidates = [{"C1": d.get("C1"), "C2": d.get("C2")} for d in dicts] + [{"C1": "never-seen", "I1": 7}]
        ranked = node.http.post("/predict", json={"context": context, "candidates": candidates}).json()
        merged = [{**context, **c} for c in candidates]
        np.testing.assert_allclose(ranked["scores"], trainer_scores(trainer, merged), rtol=0, atol=1e-5)
        assert node.http.get("/readyz").json()["ready"] is True
        assert node.metric("freshrec_serving_version") == version
        assert node.metric('freshrec_serving_requests_total{endpoint="/predict",status="200"}') >= 6


def test_a_new_node_and_several_nodes_follow_on_their_own(redis_config):
    trainer = Trainer(redis_config)
    for _ in range(6):
        trainer.step()
    with Node(redis_config) as a, Node(redis_config) as b:
        a.wait_version(6)
        b.wait_version(6)
        assert a.follower.health.reloads == 1 and a.follower.health.versions_applied == 3  # snapshot 4, 5, 6
        version = trainer.step()
        a.wait_version(version)
        b.wait_version(version)
        dicts = probe_dicts(8)
        sa = a.http.post("/predict", json={"examples": dicts}).json()["scores"]
        sb = b.http.post("/predict", json={"examples": dicts}).json()["scores"]
        assert sa == sb


def _write_version(store: RedisVersionStore, version: int, base: int, arrays: dict, snapshot: bool) -> None:
    kind = Kind.SNAPSHOT if snapshot else Kind.DELTA
    manifest = Manifest(model=store.config.model, version=version, base_version=base, global_step=version,
                        topic="t", offsets={0: version}, watermark=1000.0 + version, newest_produced_ms=0,
                        created_at=time.time())
    ref = store.write_payload(kind, version, encode(Payload(kind, version, base, arrays)), 1 << 20)
    if snapshot:
        manifest.snapshot = ref
    else:
        manifest.delta = ref
    store.commit(manifest)


TINY = FeatureSchema.from_dict({"name": "tiny", "dense": [{"name": "x"}],
                                "sparse": [{"name": "user"}, {"name": "item", "id_type": "int"}],
                                "tables": {"user": 4, "item": 4}})


def _tiny_arrays(rows: dict[str, dict[int, float]], tombstones: dict[str, list[int]] | None, default: float) -> dict:
    arrays = {f"dense/{k}": v.detach().numpy() for k, v in build_model(TINY, CONFIG).state_dict().items()}
    for name in ("user", "item"):
        keys = np.array(sorted(rows.get(name, {})), np.int64)
        arrays[f"table/{name}/keys"] = keys
        arrays[f"table/{name}/values"] = np.array([[rows[name][k]] * 4 for k in keys], np.float32).reshape(-1, 4)
        if tombstones is None:
            arrays[f"table/{name}/default"] = np.array(default, np.float32)
        else:
            arrays[f"table/{name}/tombstones"] = np.array(sorted(tombstones.get(name, [])), np.int64)
    return arrays


def test_tombstoned_keys_read_the_default_and_unknown_ids_too(redis_config):
    store = RedisVersionStore(redis_config)
    _write_version(store, 1, 0, _tiny_arrays({"item": {5: 1.0, 6: 2.0}}, None, default=0.25), snapshot=True)
    with Node(redis_config, schema=TINY) as node:
        node.wait_version(1)
        assert node.follower.current.lookup("item", np.array([5, 6, 7]))[:, 0].tolist() == [1.0, 2.0, 0.25]
        _write_version(store, 2, 1, _tiny_arrays({"item": {7: 3.0}}, {"item": [5]}, 0.0), snapshot=False)
        node.wait_version(2)
        assert node.follower.current.lookup("item", np.array([5, 6, 7]))[:, 0].tolist() == [0.25, 2.0, 3.0]
        # Over HTTP: a tombstoned id scores like an id the node never had.
        scores = node.http.post("/predict", json={"context": {"x": 1.0},
                                                  "candidates": [{"item": 5}, {"item": 12345}, {"item": 7}]}).json()
        assert scores["scores"][0] == scores["scores"][1] != scores["scores"][2]
        assert node.http.get("/model").json()["live_rows"] == {"user": 0, "item": 2}


def test_a_gap_keeps_the_last_good_version_says_so_and_heals_from_a_snapshot(redis_config):
    trainer = Trainer(redis_config, snapshot_every=100)
    with Node(redis_config, max_lag_versions=1, admin_token="t") as node:
        node.wait_version(trainer.step())
        admin = {"authorization": "Bearer t"}
        assert node.http.post("/admin/pin", json={}, headers=admin).json()["pinned"] == 1  # hold it
        for _ in range(3):
            trainer.step()
        trainer.store.redis.delete(trainer.store.key("manifest", 2))  # version 2 is lost,
        trainer.store.redis.zrem(trainer.store.key("snapshots"), 2, 3, 4)  # and no snapshot after it
        node.http.post("/admin/unpin", headers=admin)
        wait_until(lambda: node.http.get("/readyz").status_code == 503, "not ready: lagging beyond the bound")
        body = node.http.get("/readyz").json()
        assert body["version"] == 1 and body["lag_versions"] == 3 and "behind the head" in body["reason"]
        assert "version 2 is not in Redis" in body["degraded"]
        r = node.http.post("/predict", json={"examples": probe_dicts(4)})
        assert r.status_code == 200 and r.json()["version"] == 1  # still serving the last good version
        assert node.metric('freshrec_serving_follower_errors_total{reason="gap"}') >= 1
        assert node.metric("freshrec_serving_lag_versions") == 3 and node.metric("freshrec_serving_ready") == 0
        # The trainer restarts: its first version is a snapshot, from which the node recovers.
        restarted = Trainer(redis_config)
        restarted.learner = trainer.learner
        version = restarted.step()
        node.wait_version(version)
        assert node.http.get("/readyz").status_code == 200
        assert node.metric("freshrec_serving_degraded") == 0


def test_a_flushed_redis_keeps_the_node_serving_until_a_new_trainer_publishes(redis_config):
    trainer = Trainer(redis_config)
    with Node(redis_config) as node:
        trainer.step()
        node.wait_version(trainer.step())
        for key in trainer.store.redis.scan_iter(match=f"{redis_config.prefix}:*"):
            trainer.store.redis.delete(key)
        wait_until(lambda: node.follower.health.last_error_reason == "flushed", "the flush to be noticed")
        ready = node.http.get("/readyz")
        assert ready.status_code == 200 and "flushed" in ready.json()["degraded"]  # degraded, not dark
        assert node.http.post("/predict", json={"examples": probe_dicts(2)}).json()["version"] == 2
        assert node.metric("freshrec_serving_degraded") == 1
        fresh = Trainer(redis_config)  # a new trainer on the empty Redis starts again at version 1
        fresh.step()
        wait_until(lambda: node.follower.current.manifest.created_at == fresh.store.manifest(1).created_at,
                   "the node to load the new trainer's version 1")
        assert node.http.get("/readyz").json()["degraded"] is None


def test_admin_pin_rollback_unpin(redis_config):
    trainer = Trainer(redis_config, snapshot_every=2)
    with Node(redis_config, admin_token="s3cret") as node, Node(redis_config) as closed:
        for _ in range(4):
            version = trainer.step()
        node.wait_version(version)
        auth = {"authorization": "Bearer s3cret"}
        assert closed.http.post("/admin/pin", json={}).status_code == 404  # no token configured: disabled
        assert node.http.post("/admin/pin", json={}).status_code == 401
        assert node.http.post("/admin/pin", json={}, headers={"authorization": "Bearer nope"}).status_code == 403
        assert node.http.get("/admin/versions", headers=auth).json()["retained"] == [2, 3, 4]

        r = node.http.post("/admin/rollback", json={"version": 3}, headers=auth)
        assert r.status_code == 200 and r.json() == {"version": 3, "pinned": 3, "head": 4}
        dicts = probe_dicts(4)
        assert node.http.post("/predict", json={"examples": dicts}).json()["version"] == 3
        trainer.step()  # version 5: a pinned node does not follow
        time.sleep(0.5)
        assert node.version() == 3 and node.http.get("/readyz").status_code == 200
        assert node.http.post("/admin/rollback", json={"version": 5}, headers=auth).status_code == 409
        assert node.http.post("/admin/pin", json={"version": 99}, headers=auth).status_code == 404
        for _ in range(2):  # snapshots at 6 (retention keeps 4 and 6): 1..3 are gone
            trainer.step()
        assert node.http.post("/admin/pin", json={"version": 2}, headers=auth).status_code == 404
        r = node.http.post("/admin/pin", json={"version": 5}, headers=auth)
        assert r.status_code == 200 and node.version() == 5

        assert node.http.post("/admin/unpin", headers=auth).json()["pinned"] is None
        node.wait_version(7)
        body = node.http.post("/predict", json={"examples": dicts}).json()
        np.testing.assert_allclose(body["scores"], trainer_scores(trainer, dicts), rtol=0, atol=1e-5)


# ---- request validation (no Redis: the follower is not started) ------------------------


@pytest.fixture(scope="module")
def client():
    config = ServingConfig(max_examples=8, max_body_bytes=4096)
    app = create_app(SCHEMA, CONFIG, RedisConfig(url="redis://127.0.0.1:1/0"), config)
    return TestClient(app)  # no `with`: lifespan (the follower) does not run


@pytest.mark.parametrize("body, field, why", [
    ({"examples": [{"I1": "seven"}]}, ["body", "examples", 0, "I1"], "valid number"),
    ({"examples": [{"C1": 3}]}, ["body", "examples", 0, "C1"], "valid string"),
    ({"examples": [{"I1": True}]}, ["body", "examples", 0, "I1"], "valid number"),
    ({"candidates": [{}, {"C7": ["a"]}]}, ["body", "candidates", 1, "C7"], "valid string"),
    ({"context": {"bogus": 1}, "candidates": [{}]}, ["body", "context", "bogus"], "Extra inputs"),
    ({"examples": [], "candidates": []}, ["body"], "either `examples`"),
    ({"examples": [{}], "context": {}}, ["body"], "`context` goes with `candidates`"),
])
def test_wrong_input_gets_a_422_naming_the_field(client, body, field, why):
    r = client.post("/predict", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"] == field and why in d["msg"] for d in detail), detail


def test_not_json_is_a_422_and_too_much_is_a_413(client):
    r = client.post("/predict", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    r = client.post("/predict", json={"candidates": [{}] * 9})
    assert r.status_code == 413 and "limit of 8" in r.text
    r = client.post("/predict", json={"candidates": [{"C1": "x" * 100}] * 60})
    assert r.status_code == 413 and "exceeds" in r.text
    # a valid request with no version loaded yet
    assert client.post("/predict", json={"examples": [{"I1": 1, "label": 1, "ts": 5}]}).status_code == 503
    assert client.post("/predict", json={"candidates": []}).status_code == 503


def test_request_models_come_from_the_schema(client):
    spec = client.get("/openapi.json").json()
    example = spec["components"]["schemas"]["CriteoExample"]
    assert set(SCHEMA.dense_names + SCHEMA.sparse_names) <= set(example["properties"])
    assert example["additionalProperties"] is False
    request = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request == {"$ref": "#/components/schemas/PredictRequest"}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 503
