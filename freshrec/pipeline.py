"""Composition: builds each part of the pipeline from the settings.

This is the only module that knows every part; the parts themselves only know their own
configuration and what lies upstream of them.
"""

from __future__ import annotations

import threading

import torch
from fastapi import FastAPI
from prometheus_client import start_http_server

from freshrec.settings import Settings, load_settings
from publisher.publisher import Publisher
from publisher.redis_store import RedisVersionStore
from publisher.restore import restore_learner
from serving.app import create_app
from stream.sample import SampleCodec
from stream.topics import ensure_topics
from trainer.learner import OnlineLearner
from trainer.loop import Position, TrainingLoop
from trainer.metrics import MetricsHook
from trainer.source import KafkaSampleSource


def build_training_loop(settings: Settings) -> TrainingLoop:
    schema = settings.feature_schema()
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.samples_topic, kafka.dead_letter_topic], kafka.partitions)
    learner = OnlineLearner(schema, settings.trainer)
    store = RedisVersionStore(settings.redis)
    publisher = Publisher(store, settings.publisher)
    position = Position(topic=kafka.samples_topic)
    restored = restore_learner(store, learner, kafka.samples_topic)
    if restored is not None:
        position = restored.position
        if restored.version == store.head():  # else the chain broke: the next version is a snapshot
            publisher.resume(restored.version, {name: t.mark() for name, t in learner.sparse.tables.items()})
    source = KafkaSampleSource(kafka, SampleCodec(schema), settings.trainer.batch_size,
                               settings.trainer.max_batch_wait_ms, start_offsets=position.offsets)
    hooks = [publisher, MetricsHook(source, learner)]
    return TrainingLoop(source, learner, hooks, position)


def train(settings: Settings, stop: threading.Event) -> TrainingLoop:
    if settings.trainer.torch_threads:
        torch.set_num_threads(settings.trainer.torch_threads)
    if settings.trainer.metrics_port:
        start_http_server(settings.trainer.metrics_port, addr=settings.trainer.metrics_host)
    loop = build_training_loop(settings)
    loop.run(stop)
    return loop


def build_serving_app(settings: Settings) -> FastAPI:
    return create_app(settings.feature_schema(), settings.trainer, settings.redis, settings.serving)


def serving_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` (several workers each build their own node)."""
    return build_serving_app(load_settings())
