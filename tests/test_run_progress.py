"""`freshrec run`'s progress line is read from the trainer's own Prometheus metrics."""

import math

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from freshrec.commands.run import _progress_line, _trainer_metrics


def exposition() -> bytes:
    registry = CollectorRegistry()
    Counter("freshrec_trainer_samples", "", registry=registry).inc(12_800)
    dead = Counter("freshrec_trainer_dead_letters", "", ["reason"], registry=registry)
    dead.labels("bad_label").inc(2)
    dead.labels("malformed_json").inc(1)
    rows = Gauge("freshrec_trainer_live_rows", "", ["table"], registry=registry)
    rows.labels("C1").set(100)
    rows.labels("C2").set(50)
    Gauge("freshrec_trainer_progressive_auc", "", registry=registry).set(math.nan)
    Gauge("freshrec_publisher_version", "", registry=registry).set(7)
    return generate_latest(registry)


def test_progress_line_from_the_trainers_metrics():
    http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=exposition())))
    trainer = _trainer_metrics(http, "http://trainer/metrics")
    line = _progress_line(trainer, 640.0, {"version": 6, "model_age_s": 0.5}, 12.0)
    assert "trained    12,800" in line and "640 samples/s" in line
    assert "dead 3" in line and "rows       150" in line  # summed over labels
    assert "AUC   n/a" in line  # undefined until both labels were seen
    assert "published v7" in line and "serving v6" in line


def test_progress_line_before_anything_runs():
    http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(503)))
    line = _progress_line(_trainer_metrics(http, "http://trainer/metrics"), 0.0, None, 1.0)
    assert "trainer starting" in line and "waiting for a version" in line
