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
    # How samples are written: "json" (the default contract) or "binary" (`stream.binary`: the
    # trainer's fastest path, ~8x cheaper to decode). The trainer reads both from one topic.
    sample_format: Literal["json", "binary"] = "json"


class JoinerConfig(BaseModel):
    """`freshrec join`: impressions ⨝ clicks within an attribution window -> labeled samples.

    Windows are closed by event time: per partition, the watermark is the smallest of the
    largest event times seen on the impressions and on the clicks partition, minus
    `allowed_lateness_s`. See stream/joiner.py and README (Joiner) for the exact semantics."""

    # Consumer group, and the prefix of the state table's changelog topic.
    app_id: str = "freshrec-joiner"
    window_s: float = Field(default=30.0, gt=0, description="attribution window after the impression")
    allowed_lateness_s: float = Field(default=2.0, ge=0, description="event-time disorder tolerated")
    # A click that arrives after its impression's window was closed (negative emitted), or whose
    # event time is past the window: "drop" (count only), "dead_letter" (count, and send it to the
    # dead-letter topic with reason late_click), "positive" (count, and emit the impression again
    # with label 1 once: the trainer then sees the negative and the late positive).
    late_clicks: Literal["drop", "dead_letter", "positive"] = "drop"
    # How long (event time) a closed impression is remembered after its window, to recognise
    # late clicks; after that a click for it is an unknown impression.
    late_click_retention_s: float = Field(default=60.0, ge=0)
    # A topic partition (impressions or clicks) that delivered nothing for this many seconds of
    # wall time stops holding the watermark back; None: never (windows wait for both inputs).
    idle_input_s: float | None = Field(default=30.0, gt=0)
    # Clicks held for an impression not seen yet; more for the same impression are counted and dropped.
    max_pending_clicks: int = Field(default=8, ge=1)
    # Events must be keyed by their request id (that is what co-partitions an impression with its
    # clicks); unkeyed or wrongly keyed events go to the dead-letter topic.
    require_key: bool = True
    max_event_bytes: int = Field(default=64 * 1024, ge=256)
    session_timeout_s: float = Field(default=10.0, gt=0, description="consumer group session timeout")
    commit_interval_s: float = Field(default=2.8, gt=0, description="offset commit interval")
    stats_interval_s: float = Field(default=10.0, gt=0, description="counters are logged this often")
    # When set, the counters are also written there (JSON, replaced atomically) at that interval.
    stats_file: str | None = None
    # Prometheus metrics (freshrec_joiner_events_total{kind}) are served on this port (0: not served).
    metrics_port: int = Field(default=9102, ge=0)
    metrics_host: str = "127.0.0.1"
