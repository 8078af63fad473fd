"""No Docker engine runs on our machines: check docker-compose.yml's structure, and that
every freshrec command and setting it uses is real."""

import json
import re
from pathlib import Path

import pytest
import yaml

from freshrec.cli import build_parser
from freshrec.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
FRESHREC_SERVICES = [name for name, s in COMPOSE["services"].items() if s.get("image") == "freshrec:latest"]
METRIC_NAME = re.compile(r"freshrec_[a-z_]+")


def test_stack_has_kafka_redis_and_freshrec_roles():
    services = COMPOSE["services"]
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    assert services["redis"]["image"].startswith("redis")
    assert {"joiner", "trainer", "serving-1", "serving-2", "producer"} <= set(FRESHREC_SERVICES)
    for name in ("kafka", "redis", "serving-1", "serving-2"):
        assert "healthcheck" in services[name]
    for name in FRESHREC_SERVICES:
        assert services[name]["restart"] == "unless-stopped"


def test_one_http_port_in_front_of_two_serving_nodes():
    services = COMPOSE["services"]
    assert services["serving"]["ports"] == ["8000:8000"]
    nginx = (ROOT / "ops/nginx/nginx.conf").read_text()
    assert "serving-1:8000" in nginx and "serving-2:8000" in nginx


def test_every_mounted_file_exists():
    for service in COMPOSE["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume


def exported_metrics() -> set[str]:
    names = set()
    for package in ("trainer", "publisher", "serving", "stream"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r'"(freshrec_[a-z_]+)"', path.read_text()))
    return names


def test_prometheus_scrapes_every_metrics_endpoint_and_the_dashboard_uses_real_metrics():
    prometheus = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"joiner:9102", "trainer:9100", "serving-1:8000", "serving-2:8000"} <= targets
    dashboard = json.loads((ROOT / "ops/grafana/dashboards/freshrec.json").read_text())
    exported = exported_metrics()
    suffixes = ("_total", "_bucket", "_count", "_sum")
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in METRIC_NAME.findall(target["expr"]):
                base = next((name[: -len(s)] for s in suffixes if name.endswith(s) and name[: -len(s)] in exported), name)
                assert base in exported, f"panel {panel['title']!r} uses {name}, which nothing exports"


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
