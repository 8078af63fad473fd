"""Prometheus metrics of the trainer, updated by a training-loop hook.

Progressive AUC and log loss are the trainer's quality signal (every batch scored before
it is learned); the rest say how fast it learns and how its tables grow and shrink.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge

from trainer.learner import OnlineLearner
from trainer.loop import Position
from trainer.source import KafkaSampleSource

log = logging.getLogger(__name__)

SAMPLES = Counter("freshrec_trainer_samples", "Samples learned")
STEPS = Counter("freshrec_trainer_steps", "Training steps")
DEAD_LETTERS = Counter("freshrec_trainer_dead_letters", "Messages sent to the dead-letter topic", ["reason"])
AUC = Gauge("freshrec_trainer_progressive_auc", "Rolling progressive-validation AUC")
LOG_LOSS = Gauge("freshrec_trainer_progressive_log_loss", "Rolling progressive-validation log loss")
LIVE_ROWS = Gauge("freshrec_trainer_live_rows", "Live rows per embedding table", ["table"])
WATERMARK = Gauge("freshrec_trainer_watermark_seconds", "Newest event time learned")
LAG = Gauge("freshrec_trainer_kafka_lag", "Messages behind the partition high watermark", ["partition"])


class MetricsHook:
    """Exports the learner's state after each step; logs a summary every `log_every_s`."""

    def __init__(self, source: KafkaSampleSource, log_every_s: float = 10.0, quality_every_s: float = 1.0) -> None:
        self.source = source
        self.log_every_s = log_every_s
        self.quality_every_s = quality_every_s
        self._samples = 0
        self._steps = 0
        self._dead: dict[str, int] = {}
        self._last_quality = 0.0
        self._last_log = time.monotonic()

    def after_step(self, learner: OnlineLearner, position: Position) -> None:
        SAMPLES.inc(learner.samples_seen - self._samples)
        STEPS.inc(learner.global_step - self._steps)
        self._samples, self._steps = learner.samples_seen, learner.global_step
        for reason, count in self.source.dead_letters.items():
            DEAD_LETTERS.labels(reason).inc(count - self._dead.get(reason, 0))
            self._dead[reason] = count
        WATERMARK.set(position.watermark)
        now = time.monotonic()
        if now - self._last_quality >= self.quality_every_s:  # AUC sorts the window: not every step
            self._last_quality = now
            self._export_quality(learner)
            for partition, lag in self.source.lag().items():
                LAG.labels(str(partition)).set(lag)
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("step %d, %d samples, progressive AUC %.4f, log loss %.4f, live rows %d",
                     learner.global_step, learner.samples_seen, learner.metrics.auc(),
                     learner.metrics.log_loss(), sum(learner.sparse.live_rows().values()))

    def close(self, learner: OnlineLearner, position: Position) -> None:
        self._export_quality(learner)

    def _export_quality(self, learner: OnlineLearner) -> None:
        AUC.set(learner.metrics.auc())
        LOG_LOSS.set(learner.metrics.log_loss())
        for table, rows in learner.sparse.live_rows().items():
            LIVE_ROWS.labels(table).set(rows)
