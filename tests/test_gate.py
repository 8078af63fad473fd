import math

from freshrec.cli import main
from publisher.config import QualityGateConfig
from publisher.gate import QualityGate
from publisher.redis_store import RedisVersionStore


def gate(override=None, **config):
    return QualityGate(QualityGateConfig(enabled=True, min_samples=100, trailing_checks=5, **config), lambda: override)


def test_holds_when_auc_falls_past_its_trailing_level_and_reopens_on_recovery():
    g = gate(auc_margin=0.02)
    assert all(g.check(auc, 1000).open for auc in (0.75, 0.76, 0.75, 0.76))
    held = g.check(0.70, 1000)
    assert not held.open and "below its trailing level" in held.reason
    assert not g.check(0.72, 1000).open  # trailing level was not dragged down by the bad period
    assert g.check(0.745, 1000).open


def test_no_verdict_while_warming_up_or_without_an_auc():
    g = gate()
    assert g.check(0.9, 1000).open
    assert g.check(0.1, 50).open  # too few samples for a verdict
    assert g.check(math.nan, 1000).open


def test_disabled_gate_always_opens_but_operator_can_hold():
    assert QualityGate(QualityGateConfig(enabled=False), lambda: None).check(0.1, 10**6).open
    assert not QualityGate(QualityGateConfig(enabled=False), lambda: "hold").check(0.9, 10**6).open
    g = gate(override="open")
    g.check(0.9, 1000)
    assert g.check(0.1, 1000).open


def test_operator_override_goes_through_redis(redis_config, monkeypatch):
    store = RedisVersionStore(redis_config)
    monkeypatch.setenv("FRESHREC_REDIS__URL", redis_config.url)
    monkeypatch.setenv("FRESHREC_REDIS__PREFIX", redis_config.prefix)
    monkeypatch.setenv("FRESHREC_REDIS__MODEL", redis_config.model)
    assert store.gate_override() is None
    assert main(["gate", "hold"]) == 0
    assert store.gate_override() == "hold"
    g = QualityGate(QualityGateConfig(), store.gate_override)
    assert not g.check(0.8, 10**6).open
    assert main(["gate", "auto"]) == 0
    assert g.check(0.8, 10**6).open
