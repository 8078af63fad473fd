"""The joiner as it runs: `freshrec join` subprocesses against a real Kafka-compatible broker.

Completion is read from the broker, never timed: a run is over when the joiner's consumer
group has committed every input offset; the joiner is then stopped (SIGTERM: it flushes and
commits) and the output topics are read to their high watermarks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from freshrec.cli import main
from freshrec.settings import Settings
from stream.config import JoinerConfig, KafkaConfig
from stream.events import click, impression

START_TIMEOUT_S = 90  # a cold process imports faust; a restart waits out the dead member's session


def write_settings(path: Path, kafka: KafkaConfig, **joiner) -> Path:
    joiner.setdefault("metrics_port", 0)  # several joiners may run at once in a test session
    cfg = JoinerConfig(app_id=f"joiner-{kafka.samples_topic}", allowed_lateness_s=0.0, idle_input_s=None,
                       session_timeout_s=6.0, stats_interval_s=0.2, stats_file=str(path.parent / "stats.json"),
                       **joiner)
    path.write_text(yaml.safe_dump(Settings(kafka=kafka, joiner=cfg).model_dump(mode="json", by_alias=True)))
    return path


def start(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli", "--config", str(config), "join"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the joiner exited ({process.returncode}) waiting for {what}:\n" \
                                       f"{log.read_text()[-3000:]}"
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; joiner log:\n{log.read_text()[-3000:]}")


class Events:
    """A scripted stream; remembers which partition each message went to."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self.producer = KafkaProducer(acks="all", **kafka.client_kwargs())
        self.sent: Counter = Counter()  # (topic, partition) -> messages
        self.partition_of: dict[str, int] = {}

    def send(self, topic: str, value: bytes, key: bytes | None) -> int:
        meta = self.producer.send(topic, value, key=key).get(timeout=30)
        self.sent[(topic, meta.partition)] += 1
        return meta.partition

    def impression(self, rid: str, ts: float, **features) -> None:
        p = self.send(self.kafka.impressions_topic, orjson.dumps(impression(rid, "a", ts, {"C1": rid, **features})),
                      rid.encode())
        self.partition_of[rid] = p

    def click(self, rid: str, ts: float) -> None:
        self.send(self.kafka.clicks_topic, orjson.dumps(click(rid, "a", ts)), rid.encode())

    def closing(self, ts: float) -> list[str]:
        """An impression and its click at `ts` on every partition: event time moves past
        every window (closing positives)."""
        rids, covered, n = [], set(), 0
        while len(covered) < self.kafka.partitions:
            rid = f"close-{n}"
            n += 1
            p = (murmur2(rid.encode()) & 0x7FFFFFFF) % self.kafka.partitions
            if p not in covered:
                covered.add(p)
                self.impression(rid, ts)
                self.click(rid, ts)
                rids.append(rid)
        return rids

    def close(self) -> None:
        self.producer.close()


def committed_all(kafka: KafkaConfig, group: str, sent: Counter) -> bool:
    consumer = KafkaConsumer(group_id=group, enable_auto_commit=False, **kafka.client_kwargs())
    try:
        return all((consumer.committed(TopicPartition(t, p)) or 0) >= n for (t, p), n in sent.items())
    finally:
        consumer.close()


def read_topic(kafka: KafkaConfig, topic: str) -> list:
    consumer = KafkaConsumer(enable_auto_commit=False, **kafka.client_kwargs())
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        out = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out += records
            high = [consumer.highwater(tp) for tp in tps]
            if None not in high and all(consumer.position(tp) >= h for tp, h in zip(tps, high)):
                return out
        raise AssertionError(f"could not read {topic} to its end")
    finally:
        consumer.close()


def samples_by_request(kafka: KafkaConfig) -> dict[tuple[str, int], list]:
    out = defaultdict(list)
    for m in read_topic(kafka, kafka.samples_topic):
        rid = dict(m.headers)["join_key"].decode().split("\x1f")[0]
        out[(rid, orjson.loads(m.value)["label"])].append(m)
    return out


def test_a_scripted_stream_gives_exactly_the_expected_samples_and_dead_letters(tmp_path, kafka_config):
    config = write_settings(tmp_path / "settings.yaml", kafka_config, window_s=10.0, late_clicks="dead_letter",
                            commit_interval_s=0.5)
    log = tmp_path / "joiner.log"
    joiner = start(config, log)
    try:
        ev = Events(kafka_config)
        # Clicks first: they may reach the joiner before their impressions; the join waits.
        clicks = []
        for i in range(40):
            if i % 3 == 0:
                clicks.append((1000 + i + 2, f"r{i}"))
            if i % 9 == 0:
                clicks += [(1000 + i + 3, f"r{i}"), (1000 + i + 4, f"r{i}")]
            if i % 5 == 1:
                clicks.append((1000 + i + 15, f"r{i}"))  # past the 10 s window
        clicks.append((1005, "ghost"))  # no impression, ever
        for ts, rid in sorted(clicks):
            ev.click(rid, ts)
        for i in range(40):
            ev.impression(f"r{i}", 1000 + i, I1=i)
        bad_imp = [(b"{not json", b"r99"), (orjson.dumps({"item_id": "a", "ts": 1.0, "features": {}}), b"r99")]
        for value, key in bad_imp:
            ev.send(kafka_config.impressions_topic, value, key)
        ev.send(kafka_config.clicks_topic, orjson.dumps(click("r1", "a", 1001.5)), None)
        ev.send(kafka_config.clicks_topic, orjson.dumps(click("r1", "a", 1001.5)), b"r2")
        closing = ev.closing(2000)
        ev.close()
        wait_for(lambda: committed_all(kafka_config, f"joiner-{kafka_config.samples_topic}", ev.sent),
                 START_TIMEOUT_S, "every input offset committed", joiner, log)
        assert stop(joiner) == 0
    finally:
        if joiner.poll() is None:
            joiner.kill()
            joiner.wait()

    samples = samples_by_request(kafka_config)
    expected = {(f"r{i}", 1 if i % 3 == 0 else 0) for i in range(40)} | {(rid, 1) for rid in closing}
    assert set(samples) == expected
    assert all(len(ms) == 1 for ms in samples.values()), "a sample was emitted twice without a crash"
    assert orjson.loads(samples[("r3", 1)][0].value) == {"C1": "r3", "I1": 3, "label": 1, "ts": 1003.0}
    assert orjson.loads(samples[("r4", 0)][0].value) == {"C1": "r4", "I1": 4, "label": 0, "ts": 1004.0}

    letters = read_topic(kafka_config, kafka_config.dead_letter_topic)
    reasons = Counter(dict(m.headers)["reason"].decode() for m in letters)
    # late clicks of r1, r11, r16, r26, r31 (r6, r21, r36 were clicked in time: only counted)
    assert reasons == {"late_click": 5, "unknown_impression": 1, "malformed_json": 1, "missing_request_id": 1,
                       "unkeyed": 1, "key_mismatch": 1}
    ghost = [m for m in letters if dict(m.headers)["reason"] == b"unknown_impression"][0]
    assert orjson.loads(ghost.value)["request_id"] == "ghost"
    assert dict(ghost.headers)["source"].decode().startswith(f"{kafka_config.clicks_topic}/")

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["duplicate_clicks"] == 10  # r0, r9, r18, r27, r36: two extra clicks each
    assert stats["late_clicks"] == 8
    assert stats["positives"] == 14 + len(closing) and stats["negatives"] == 26


def test_restart_after_sigkill_mid_window_emits_every_expected_sample_at_least_once(tmp_path, kafka_config):
    """The documented guarantee: a joiner killed (SIGKILL) with windows open and input both
    committed and not, then restarted, emits exactly the set of samples of an uninterrupted
    run (every one, and none with a different label); a sample may appear twice only as the
    same message re-emitted (it was in flight at the kill)."""
    group = f"joiner-{kafka_config.samples_topic}"
    config = write_settings(tmp_path / "settings.yaml", kafka_config, window_s=30.0, commit_interval_s=1.0)
    log = tmp_path / "joiner.log"
    stats_file = tmp_path / "stats.json"
    joiner = start(config, log)
    ev = Events(kafka_config)
    truth: dict[str, float] = {}  # request -> impression time
    clicked: dict[str, float] = {}  # request -> first click time

    def phase(first: int, last: int, step: float, t0: float) -> None:
        clicks = []
        for i in range(first, last):
            rid, ts = f"r{i}", t0 + (i - first) * step
            ev.impression(rid, ts)
            truth[rid] = ts
            if i % 4 == 0:
                clicks.append((ts + 5, rid))
            elif i % 4 == 1 and i % 3 == 0:
                clicks.append((ts + 40, rid))  # too late: still a negative
        for ts, rid in sorted(clicks):
            ev.click(rid, ts)
            clicked.setdefault(rid, ts)

    try:
        # A: its windows are still open when the input is committed: that state lives only in
        # the changelog from then on.
        phase(0, 60, 1.0, 1000.0)
        wait_for(lambda: committed_all(kafka_config, group, ev.sent), START_TIMEOUT_S, "phase A committed",
                 joiner, log)
        events_a = sum(ev.sent.values())
        # B: more events, killed while they are being joined. Event time stays below 1082:
        # the windows of r52..r59 (T + 30 >= 1082) are still open at the kill.
        phase(60, 600, 0.04, 1060.0)
        wait_for(lambda: stats_file.exists() and json.loads(stats_file.read_text())["events"] > events_a,
                 START_TIMEOUT_S, "the joiner to work on phase B", joiner, log)
        joiner.send_signal(signal.SIGKILL)
        joiner.wait()
        killed_at = time.time()
        joiner = start(config, log)
        # C: event time goes on (past every window), on every partition.
        closing = ev.closing(5000.0)
        ev.close()
        wait_for(lambda: committed_all(kafka_config, group, ev.sent), START_TIMEOUT_S, "every input committed",
                 joiner, log)
        assert stop(joiner) == 0
    finally:
        if joiner.poll() is None:
            joiner.kill()
            joiner.wait()

    expected = {(rid, int(rid in clicked and clicked[rid] <= ts + 30.0)) for rid, ts in truth.items()}
    expected |= {(rid, 1) for rid in closing}
    samples = samples_by_request(kafka_config)
    assert set(samples) == expected  # no loss, no extra sample, no impression with both labels
    for key, messages in samples.items():
        assert len({m.value for m in messages}) == 1, f"{key} was emitted with different contents"
    assert read_topic(kafka_config, kafka_config.dead_letter_topic) == []
    duplicates = sum(len(ms) - 1 for ms in samples.values())
    # Windows that were open at the kill and whose impressions had been committed came back
    # from the changelog, not from replayed input: their samples were emitted after it.
    recovered = [rid for rid in (f"r{i}" for i in range(60))
                 if all(m.timestamp / 1000 > killed_at for m in samples[(rid, 0)] + samples[(rid, 1)])]
    assert {"r53", "r54", "r55"} <= set(recovered)
    print(f"{duplicates} duplicate samples; {len(recovered)} phase-A windows recovered from the changelog")


def test_produce_raw_events_gives_keyed_impressions_and_later_clicks(tmp_path, kafka_config, monkeypatch):
    monkeypatch.setenv("FRESHREC_CONFIG", str(write_settings(tmp_path / "settings.yaml", kafka_config)))
    assert main(["produce", "--events", "raw", "--count", "300", "--rate", "0", "--click-delay", "2"]) == 0
    impressions = read_topic(kafka_config, kafka_config.impressions_topic)
    clicks = read_topic(kafka_config, kafka_config.clicks_topic)
    assert len(impressions) == 300
    shown = {}
    for m in impressions:
        obj = orjson.loads(m.value)
        assert m.key == obj["request_id"].encode()
        assert set(obj["features"]) >= {"I1", "C1"} and "label" not in obj["features"]
        shown[(obj["request_id"], obj["item_id"])] = (obj["ts"], m.partition)
    assert 0.05 * 300 < len(clicks) < 0.6 * 300  # the hidden click model's CTR is ~0.2
    for m in clicks:
        obj = orjson.loads(m.value)
        ts, partition = shown[(obj["request_id"], obj["item_id"])]
        assert obj["ts"] >= ts and m.partition == partition and m.key == obj["request_id"].encode()


def test_bench_joiner_quick(kafka_config, capsys, monkeypatch):
    """The benchmark runs end to end and its joiner output matches the in-process join (its
    figures belong to the README, not to assertions)."""
    monkeypatch.delenv("FRESHREC_CONFIG", raising=False)
    assert main(["bench", "joiner", "--quick", "--impressions", "600", "--bootstrap",
                 kafka_config.bootstrap_servers]) == 0
    report = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["samples_match"] and report["joiner_samples"] > 0
    assert report["joiner_events_per_s"] > 0 and report["plain_loop_events_per_s"] > 0
