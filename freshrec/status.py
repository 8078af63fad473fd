"""Live status of each process, as small JSON documents in Redis.

`freshrec run` shows them on the terminal; operators can read them with redis-cli. They
are for people, not for correctness: the metrics endpoint is the machine interface.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import redis

from publisher.config import RedisConfig
from publisher.publisher import Publisher
from trainer.learner import OnlineLearner
from trainer.loop import Position
from trainer.source import KafkaSampleSource

log = logging.getLogger(__name__)


class StatusBoard:
    def __init__(self, client: redis.Redis, config: RedisConfig) -> None:
        self.redis = client
        self.config = config

    def put(self, component: str, status: dict[str, Any], ttl_s: int = 30) -> None:
        self.redis.set(self.config.key("status", component), orjson.dumps(status), ex=ttl_s)

    def get(self, component: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.config.key("status", component))
        return orjson.loads(raw) if raw else None


class TrainerStatusHook:
    """A training-loop hook that reports progress about once a second."""

    def __init__(self, board: StatusBoard, source: KafkaSampleSource, publisher: Publisher,
                 every_s: float = 1.0) -> None:
        self.board = board
        self.source = source
        self.publisher = publisher
        self.every_s = every_s
        self._last = 0.0
        self._last_samples = 0
        self._rate = 0.0

    def after_step(self, learner: OnlineLearner, position: Position) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        if self._last:
            self._rate = (learner.samples_seen - self._last_samples) / (now - self._last)
        self._last, self._last_samples = now, learner.samples_seen
        try:
            self._put(learner, position)
        except redis.RedisError as e:  # status is for people: Redis away must not stop training
            log.warning("trainer status not written (%s)", e)

    def _put(self, learner: OnlineLearner, position: Position) -> None:
        self.board.put("trainer", {
            "samples": learner.samples_seen,
            "steps": learner.global_step,
            "samples_per_s": round(self._rate, 1),
            "auc": learner.metrics.auc(),
            "log_loss": learner.metrics.log_loss(),
            "dead_letters": dict(self.source.dead_letters),
            "live_rows": sum(learner.sparse.live_rows().values()),
            "published_version": self.publisher.stats.published_version,
            "watermark": position.watermark,
            "at": time.time(),
        })

    def close(self, learner: OnlineLearner, position: Position) -> None:
        self._last = 0.0
        self.after_step(learner, position)
