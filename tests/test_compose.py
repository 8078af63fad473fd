"""No Docker engine runs on our machines: check docker-compose.yml's structure, and that
every freshrec command and setting it uses is real."""

from pathlib import Path

import pytest
import yaml

from freshrec.cli import build_parser
from freshrec.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
FRESHREC_SERVICES = [name for name, s in COMPOSE["services"].items() if s.get("image") == "freshrec:latest"]


def test_stack_has_kafka_redis_and_freshrec_roles():
    services = COMPOSE["services"]
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    assert services["redis"]["image"].startswith("redis")
    assert {"trainer", "serving", "producer"} <= set(FRESHREC_SERVICES)
    for name in ("kafka", "redis"):
        assert "healthcheck" in services[name]


@pytest.mark.parametrize("service", FRESHREC_SERVICES)
def test_every_command_is_a_real_freshrec_command(service):
    command = COMPOSE["services"][service]["command"]
    args = build_parser().parse_args(command)  # exits (fails the test) on an unknown command/option
    assert callable(args.func)


@pytest.mark.parametrize("service", FRESHREC_SERVICES)
def test_every_setting_in_the_environment_exists(service, monkeypatch):
    env = COMPOSE["services"][service]["environment"]
    names = [k for k in env if k.startswith("FRESHREC_")]
    assert names
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()  # extra="forbid": an unknown section or field is an error
    for key in names:
        section, field = key[len("FRESHREC_"):].lower().split("__")
        assert hasattr(getattr(settings, section), field), key


def test_topics_created_at_start_are_the_default_topics():
    script = COMPOSE["services"]["kafka-topics"]["command"][0]
    kafka = Settings().kafka
    for topic in (kafka.samples_topic, kafka.dead_letter_topic, kafka.impressions_topic, kafka.clicks_topic):
        assert topic in script
