"""Prometheus metrics of the trainer, updated by a training-loop hook.

Progressive AUC and log loss are the trainer's quality signal (every batch scored before
it is learned), over a window of samples and over a window of time; the rest say how fast it
learns and how its tables grow and shrink.
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
AUC = Gauge("freshrec_trainer_progressive_auc", "Rolling progressive-validation AUC (last N samples)")
LOG_LOSS = Gauge("freshrec_trainer_progressive_log_loss", "Rolling progressive-validation log loss (last N samples)")
AUC_TIME = Gauge("freshrec_trainer_progressive_auc_time_window",
                 "Progressive-validation AUC over the samples scored in the last time_window_seconds")
LOG_LOSS_TIME = Gauge("freshrec_trainer_progressive_log_loss_time_window",
                      "Progressive-validation log loss over the samples scored in the last time_window_seconds")
WINDOW_SAMPLES = Gauge("freshrec_trainer_progressive_window_samples",
                       "Samples in each progressive-validation window", ["window"])
TIME_WINDOW_SECONDS = Gauge("freshrec_trainer_progressive_time_window_seconds", "Length of the time window")
ADMISSIONS = Counter("freshrec_trainer_rows_admitted", "Keys given a trainable row (admitted)")
EVICTIONS = Counter("freshrec_trainer_rows_evicted", "Rows evicted (idle or small), published as tombstones")
LIVE_ROWS = Gauge("freshrec_trainer_live_rows", "Live rows per embedding table", ["table"])
WATERMARK = Gauge("freshrec_trainer_watermark_seconds", "Newest event time learned")
LAG = Gauge("freshrec_trainer_kafka_lag", "Messages behind the partition high watermark", ["partition"])


class MetricsHook:
    """Exports the learner's state every `export_every_s` (and when training stops); logs a
    summary every `log_every_s`. Not every step: AUC sorts its window, the row counts visit
    26 tables, and even the counters alone cost the training thread ~25 µs a step between
    two steps (locks and code the step had evicted), 0.5% of a Wide & Deep step; Prometheus
    scrapes every few seconds."""

    def __init__(self, source: KafkaSampleSource, learner: OnlineLearner, log_every_s: float = 10.0,
                 export_every_s: float = 1.0) -> None:
        self.source = source
        self.log_every_s = log_every_s
        self.export_every_s = export_every_s
        # Counters count what this process does: a resumed learner's totals are the baseline.
        self._samples = learner.samples_seen
        self._steps = learner.global_step
        self._live = sum(learner.sparse.live_rows().values())
        self._evicted = learner.rows_evicted
        self._dead: dict[str, int] = {}
        self._last_export = 0.0
        self._last_log = time.monotonic()

    def after_step(self, learner: OnlineLearner, position: Position) -> None:
        now = time.monotonic()
        if now - self._last_export >= self.export_every_s:
            self._last_export = now
            self._export(learner, position)
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            m = learner.metrics
            log.info("step %d, %d samples, progressive AUC %.4f / log loss %.4f (last %d samples), "
                     "AUC %.4f / log loss %.4f (last %.0f s, %d samples), dead letters %d, live rows %d",
                     learner.global_step, learner.samples_seen, m.auc(), m.log_loss(), min(m.seen, m.window),
                     m.time_auc(), m.time_log_loss(), m.time_window_s, m.time_window_count(),
                     sum(self.source.dead_letters.values()), sum(learner.sparse.live_rows().values()))

    def _count_rows(self, learner: OnlineLearner) -> None:
        """Admissions are derived: every row that exists or was evicted was admitted once."""
        live = sum(learner.sparse.live_rows().values())
        evicted = learner.rows_evicted - self._evicted
        EVICTIONS.inc(evicted)
        ADMISSIONS.inc(max(0, live - self._live + evicted))
        self._live, self._evicted = live, learner.rows_evicted

    def close(self, learner: OnlineLearner, position: Position) -> None:
        self._export(learner, position)

    def _export(self, learner: OnlineLearner, position: Position) -> None:
        SAMPLES.inc(learner.samples_seen - self._samples)
        STEPS.inc(learner.global_step - self._steps)
        self._samples, self._steps = learner.samples_seen, learner.global_step
        for reason, count in self.source.dead_letters.items():
            DEAD_LETTERS.labels(reason).inc(count - self._dead.get(reason, 0))
            self._dead[reason] = count
        WATERMARK.set(position.watermark)
        self._count_rows(learner)
        self._export_quality(learner)
        for partition, lag in self.source.lag().items():
            LAG.labels(str(partition)).set(lag)

    def _export_quality(self, learner: OnlineLearner) -> None:
        m = learner.metrics
        AUC.set(m.auc())
        LOG_LOSS.set(m.log_loss())
        AUC_TIME.set(m.time_auc())
        LOG_LOSS_TIME.set(m.time_log_loss())
        WINDOW_SAMPLES.labels("samples").set(min(m.seen, m.window))
        WINDOW_SAMPLES.labels("time").set(m.time_window_count())
        TIME_WINDOW_SECONDS.set(m.time_window_s)
        for table, rows in learner.sparse.live_rows().items():
            LIVE_ROWS.labels(table).set(rows)
