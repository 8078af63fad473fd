"""Topic creation. freshrec creates its topics explicitly: a broker that auto-creates them
on first use gives them its own default partition count (Tansu: not the configured one),
and faust and the trainer's partition assignment expect `KafkaConfig.partitions`."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from stream.config import KafkaConfig


def samples_topics(cfg: KafkaConfig) -> list[str]:
    """Every topic the freshrec pipeline reads or writes."""
    return [cfg.samples_topic, cfg.dead_letter_topic, cfg.impressions_topic, cfg.clicks_topic]


def ensure_topics(cfg: KafkaConfig, names: list[str], partitions: int | None = None) -> list[str]:
    """Create the missing topics among `names` (`partitions` defaults to cfg.partitions) and
    return the ones created. Existing topics are left as they are, whatever their partition
    count; another process creating the same topic at the same time is not an error."""
    admin = KafkaAdminClient(**cfg.client_kwargs())
    try:
        existing = set(admin.list_topics())
        created = []
        for name in dict.fromkeys(names):
            if name in existing:
                continue
            try:
                # One request per topic, so a concurrent creator of one does not hide errors on others.
                admin.create_topics([NewTopic(name, partitions or cfg.partitions, 1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
