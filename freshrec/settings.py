"""All configuration, from one place: defaults that work on a laptop, then a YAML file
(`--config` or FRESHREC_CONFIG), then environment variables, which win.

Environment variables are FRESHREC_<SECTION>__<FIELD>, for example
FRESHREC_KAFKA__BOOTSTRAP_SERVERS=broker:9092 or FRESHREC_PUBLISHER__INTERVAL_S=1.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from ops.config import StackConfig
from publisher.config import PublisherConfig, RedisConfig
from serving.config import ServingConfig
from stream.config import JoinerConfig, KafkaConfig, ProducerConfig
from stream.schema import FeatureSchema, load_schema
from trainer.config import TrainerConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRESHREC_", env_nested_delimiter="__", extra="forbid")

    # A built-in schema name ("criteo", "movielens") or a path to a schema YAML file.
    schema_name: str = Field(default="criteo", alias="schema")
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    producer: ProducerConfig = Field(default_factory=ProducerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    publisher: PublisherConfig = Field(default_factory=PublisherConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    stack: StackConfig = Field(default_factory=StackConfig)
    joiner: JoinerConfig = Field(default_factory=JoinerConfig)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("FRESHREC_CONFIG")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=Path(path)))
        return tuple(sources)

    def feature_schema(self) -> FeatureSchema:
        return load_schema(self.schema_name)


def load_settings(config_path: str | None = None) -> Settings:
    if config_path:
        os.environ["FRESHREC_CONFIG"] = config_path
    return Settings()
