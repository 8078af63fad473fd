"""Configuration of the event side: Kafka connection, topics, the synthetic producer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class KafkaConfig(BaseModel):
    """How every freshrec process reaches Kafka. Security settings pass through to clients."""

    bootstrap_servers: str = "127.0.0.1:19092"
    samples_topic: str = "freshrec.samples"
    dead_letter_topic: str = "freshrec.dead-letter"
    impressions_topic: str = "freshrec.impressions"
    clicks_topic: str = "freshrec.clicks"
    partitions: int = Field(default=4, ge=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python producers, consumers and admin clients."""
        kw: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(","),
                              "security_protocol": self.security_protocol}
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
        }
        kw.update({k: v for k, v in optional.items() if v is not None})
        return kw


class ProducerConfig(BaseModel):
    """`freshrec produce`: what to send and how fast."""

    rate: float = Field(default=2000.0, gt=0, description="events per second")
    seed: int = 7
    max_events: int | None = None
    batch_size: int = 500
