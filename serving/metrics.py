"""Prometheus metrics of a serving node (one registry per app; each worker process has its own).

Request counters and the latency histogram are updated as requests finish; version, head,
lag, model age, table sizes and readiness are read from the follower when scraped.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from serving.follower import VersionFollower

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
APPLY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("freshrec_serving_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("freshrec_serving_request_seconds", "time to answer, by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.examples = Counter("freshrec_serving_examples", "examples and candidates scored",
                                registry=self.registry)
        self.apply_seconds = Histogram("freshrec_serving_apply_seconds",
                                       "time to read, check and apply one version, by kind", ["kind"],
                                       buckets=APPLY_BUCKETS, registry=self.registry)
        self.applied_rows = Counter("freshrec_serving_applied_rows", "rows and tombstones applied, by kind",
                                    ["kind"], registry=self.registry)
        self.follower_errors = Counter("freshrec_serving_follower_errors",
                                       "why the node could not follow (gap, payload, redis, flushed, internal)",
                                       ["reason"], registry=self.registry)
        for reason in ("gap", "payload", "redis", "flushed", "helper", "internal"):
            self.follower_errors.labels(reason)
        self._predict_ok = self.requests.labels("/predict", "200")
        self._predict_latency = self.latency.labels("/predict")

    def observe_apply(self, kind: str, seconds: float, rows: int) -> None:
        self.apply_seconds.labels(kind).observe(seconds)
        self.applied_rows.labels(kind).inc(rows)

    def observe_error(self, reason: str) -> None:
        self.follower_errors.labels(reason).inc()

    def observe_predict(self, seconds: float, n: int) -> None:
        self._predict_ok.inc()
        self._predict_latency.observe(seconds)
        self.examples.inc(n)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def watch(self, follower: "VersionFollower", max_lag_versions: int | None,
              max_lag_seconds: float | None) -> None:
        self.registry.register(_FollowerCollector(follower, max_lag_versions, max_lag_seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def readiness(follower: "VersionFollower", max_lag_versions: int | None,
              max_lag_seconds: float | None) -> tuple[bool, str | None, dict]:
    """(ready, why not, details). Ready once a version is loaded, unless it lags the head by
    more than the bound. A pinned node is ready (it lags on purpose). A node that cannot
    reach Redis stays ready on its last good version and says so (`degraded`)."""
    model = follower.current
    health = follower.health
    details: dict = {"version": model.version if model else None, "head": health.head,
                     "pinned": follower.pinned, "degraded": health.last_error}
    if model is None:
        return False, health.last_error or "no version loaded yet", details
    lag = (health.head - model.version) if health.head is not None else None
    details["lag_versions"] = lag
    if follower.pinned is not None:
        return True, None, details
    if max_lag_versions is not None and lag is not None and lag > max_lag_versions:
        return False, f"{lag} versions behind the head (bound {max_lag_versions})", details
    if max_lag_seconds is not None and lag:
        behind = time.time() - model.manifest.created_at
        if behind > max_lag_seconds:
            return False, f"behind the head, serving a version {behind:.0f}s old (bound {max_lag_seconds}s)", details
    return True, None, details


class _FollowerCollector:
    def __init__(self, follower: "VersionFollower", max_lag_versions: int | None,
                 max_lag_seconds: float | None) -> None:
        self.follower = follower
        self.bounds = (max_lag_versions, max_lag_seconds)

    def describe(self):
        return []

    def collect(self):
        f = self.follower
        model = f.current
        health = f.health

        def gauge(name: str, doc: str, value: float | None):
            g = GaugeMetricFamily(name, doc)
            if value is not None:
                g.add_metric([], value)
            return g

        lag = (health.head - model.version) if (model and health.head is not None) else None
        ready, _, _ = readiness(f, *self.bounds)
        yield gauge("freshrec_serving_version", "version being served", model.version if model else None)
        yield gauge("freshrec_serving_global_step", "global step of the version served",
                    model.manifest.global_step if model else None)
        yield gauge("freshrec_serving_head_version", "newest version published (as last seen)", health.head)
        yield gauge("freshrec_serving_lag_versions", "head minus the version served", lag)
        yield gauge("freshrec_serving_model_age_seconds", "seconds since the served version was cut",
                    time.time() - model.manifest.created_at if model else None)
        yield gauge("freshrec_serving_watermark_seconds", "event-time watermark of the served version",
                    model.manifest.watermark if model else None)
        newest = model.manifest.newest_produced_ms if model else 0
        yield gauge("freshrec_serving_freshness_seconds",
                    "now minus the produce time of the newest event the served version learned "
                    "(an upper bound on the freshness of every event it includes; "
                    "`freshrec bench freshness` measures per-event freshness end to end)",
                    time.time() - newest / 1000 if newest else None)
        yield gauge("freshrec_serving_ready", "1 when /readyz answers 200", float(ready))
        yield gauge("freshrec_serving_degraded", "1 while the follower is failing (serving its last good version)",
                    float(health.last_error is not None))
        yield gauge("freshrec_serving_redis_up", "1 when Redis answered the follower's last request",
                    float(health.redis_ok))
        yield gauge("freshrec_serving_pinned", "1 while an operator pinned the node", float(f.pinned is not None))
        yield gauge("freshrec_serving_versions_applied", "versions applied since start", health.versions_applied)
        yield gauge("freshrec_serving_reloads", "snapshot loads since start", health.reloads)
        rows = GaugeMetricFamily("freshrec_serving_live_rows", "rows in each table of the served version",
                                 labels=["table"])
        for table, n in (model.live_rows if model else {}).items():
            rows.add_metric([table], n)
        yield rows
