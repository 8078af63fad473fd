"""The join logic alone (`JoinCore`, no broker): window semantics, late clicks, bad events,
independence from how the two topics interleave, and at-least-once recovery from a crash
at any point (simulated: outputs reach the "broker" in any order across topics, in order
within one, and a crash loses what had not arrived)."""

from __future__ import annotations

import copy
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.config import JoinerConfig
from stream.events import click, impression, join_key
from stream.joiner import JoinCore

W = 10.0


def cfg(**kw) -> JoinerConfig:
    base = dict(window_s=W, allowed_lateness_s=0.0, idle_input_s=None, late_click_retention_s=20.0)
    return JoinerConfig(**{**base, **kw})


@dataclass
class Recorder:
    """A sink whose sends are acknowledged at once."""

    samples: list[tuple[bytes, int, dict]] = field(default_factory=list)
    dead: list[tuple[str, bytes]] = field(default_factory=list)
    log: list[tuple[int, bytes, list | None]] = field(default_factory=list)

    def sample(self, value, key, label, on_ack):
        self.samples.append((key, label, orjson.loads(value)))
        on_ack()

    def dead_letter(self, value, reason, detail, source, on_ack):
        self.dead.append((reason, value))
        if on_ack:
            on_ack()

    def persist(self, partition, key, state):
        self.log.append((partition, key, copy.deepcopy(state)))


def imp(core: JoinCore, rid: str, ts: float, item: str = "i", p: int = 0, **features) -> None:
    core.impression(p, 0, rid.encode(), orjson.dumps(impression(rid, item, ts, {"C1": rid, **features})))


def clk(core: JoinCore, rid: str, ts: float, item: str = "i", p: int = 0) -> None:
    core.click(p, 0, rid.encode(), orjson.dumps(click(rid, item, ts)))


def labels(sink: Recorder) -> list[tuple[str, int]]:
    return [(k.decode().split("\x1f")[0], label) for k, label, _ in sink.samples]


def advance(core: JoinCore, ts: float, p: int = 0) -> None:
    """Move partition p's watermark to `ts` with an impression and a click of a filler request."""
    rid = f"filler-{ts}"
    imp(core, rid, ts, p=p)
    clk(core, rid, ts, p=p)


def test_first_click_emits_the_positive_once_with_the_impression_features_and_time() -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    imp(core, "r1", 100.0, I1=3)
    for t in (101.0, 102.0, 109.0):
        clk(core, "r1", t)
    assert sink.samples == [(join_key("r1", "i"), 1, {"C1": "r1", "I1": 3, "label": 1, "ts": 100.0})]
    assert core.counters["duplicate_clicks"] == 2
    advance(core, 200.0)  # the window closes: no negative for a clicked impression
    assert labels(sink) == [("r1", 1), ("filler-200.0", 1)]


def test_window_closes_on_the_watermark_of_both_topics_and_emits_the_negative() -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    imp(core, "r1", 100.0)
    imp(core, "r2", 115.0)  # impressions alone do not move the watermark: clicks could lag
    assert sink.samples == []
    clk(core, "r2", 116.0)  # watermark = min(115, 116) = 115 > 100 + 10
    assert labels(sink) == [("r2", 1), ("r1", 0)]
    clk(core, "r1", 109.0)  # in the window by event time, but after the close: late
    assert labels(sink) == [("r2", 1), ("r1", 0)]
    assert core.counters["late_clicks"] == 1


def test_exactly_at_the_window_end_is_in_the_window() -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    imp(core, "r1", 100.0)
    clk(core, "r1", 110.0)
    advance(core, 111.0)
    assert ("r1", 1) in labels(sink) and ("r1", 0) not in labels(sink)


def test_a_click_before_its_impression_waits_for_it() -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    clk(core, "r1", 103.0)
    assert sink.samples == [] and core.counters["pending_clicks"] == 1
    imp(core, "r1", 100.0)
    assert labels(sink) == [("r1", 1)]


def test_a_click_whose_impression_never_comes_is_dead_lettered_when_the_watermark_passes() -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    clk(core, "ghost", 103.0)
    advance(core, 103.0)
    assert sink.dead == []  # not past yet: the impression may still come
    advance(core, 104.0)
    assert [r for r, _ in sink.dead] == ["unknown_impression"]
    assert orjson.loads(sink.dead[0][1])["request_id"] == "ghost"
    clk(core, "ghost2", 50.0)  # already behind the watermark: at once
    assert [r for r, _ in sink.dead] == ["unknown_impression"] * 2
    assert core.counters["dead_letter.unknown_impression"] == 2


@pytest.mark.parametrize("policy", ["drop", "dead_letter", "positive"])
def test_late_click_policies(policy: str) -> None:
    sink = Recorder()
    core = JoinCore(cfg(late_clicks=policy), sink, {})
    imp(core, "r1", 100.0)
    advance(core, 120.0)  # closes r1: negative
    clk(core, "r1", 121.0)
    clk(core, "r1", 122.0)
    assert core.counters["late_clicks"] == 2
    r1 = [label for rid, label in labels(sink) if rid == "r1"]
    late_letters = [r for r, _ in sink.dead if r == "late_click"]
    if policy == "drop":
        assert r1 == [0] and late_letters == []
    elif policy == "dead_letter":
        assert r1 == [0] and late_letters == ["late_click"] * 2
    else:  # one late positive, with the impression's features
        assert r1 == [0, 1] and late_letters == []
        assert sink.samples[-1][2] == {"C1": "r1", "label": 1, "ts": 100.0}
        assert core.counters["late_positives"] == 1


def test_a_click_past_the_window_is_late_even_before_the_window_closes() -> None:
    sink = Recorder()
    core = JoinCore(cfg(late_clicks="positive"), sink, {})
    imp(core, "r1", 100.0)
    clk(core, "r1", 111.0)  # event time past the window; the watermark has not closed it yet
    assert core.counters["late_clicks"] == 1 and sink.samples == []
    advance(core, 112.0)
    assert [label for rid, label in labels(sink) if rid == "r1"] == [0, 1]


def test_closed_impressions_are_forgotten_after_the_retention() -> None:
    sink = Recorder()
    state: dict = {}
    core = JoinCore(cfg(), sink, state)
    imp(core, "r1", 100.0)
    advance(core, 111.0)
    assert join_key("r1", "i") in state
    advance(core, 131.0)  # 100 + 10 + 20 < 131
    assert join_key("r1", "i") not in state
    assert core.rotate_tombstones() == [] and core.rotate_tombstones() == []  # not before two commits
    assert core.rotate_tombstones() == [(0, join_key("r1", "i"))]
    clk(core, "r1", 131.0)
    advance(core, 132.0)
    assert ("unknown_impression") in [r for r, _ in sink.dead]


@pytest.mark.parametrize(("raw", "key", "reason"), [
    (b"{not json", b"r", "malformed_json"),
    (b"[1, 2]", b"r", "not_an_object"),
    (orjson.dumps({"item_id": "i", "ts": 1.0, "features": {}}), b"r", "missing_request_id"),
    (orjson.dumps({"request_id": "r", "ts": 1.0, "features": {}}), b"r", "missing_item_id"),
    (orjson.dumps({"request_id": 1.5, "item_id": "i", "ts": 1.0, "features": {}}), b"r", "bad_request_id"),
    (orjson.dumps({"request_id": "r", "item_id": "i", "features": {}}), b"r", "missing_event_time"),
    (orjson.dumps({"request_id": "r", "item_id": "i", "ts": "soon", "features": {}}), b"r", "bad_event_time"),
    (orjson.dumps({"request_id": "r", "item_id": "i", "ts": 1.0}), b"r", "missing_features"),
    (orjson.dumps({"request_id": "r", "item_id": "i", "ts": 1.0, "features": [1]}), b"r", "bad_features"),
    (orjson.dumps(impression("r", "i", 1.0, {})), None, "unkeyed"),
    (orjson.dumps(impression("r", "i", 1.0, {})), b"other", "key_mismatch"),
    (b"x" * 70_000, b"r", "oversized"),
])
def test_bad_impressions_are_dead_lettered_with_their_reason(raw: bytes, key: bytes | None, reason: str) -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    core.impression(0, 7, key, raw)
    assert sink.dead == [(reason, raw)]
    assert core.counters[f"dead_letter.{reason}"] == 1
    imp(core, "ok", 1.0)  # and the joiner goes on
    clk(core, "ok", 2.0)
    assert labels(sink) == [("ok", 1)]


def test_bad_clicks_are_dead_lettered_and_integer_ids_are_ids() -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    core.click(0, 1, b"r", b"\xff\xfe")
    core.click(0, 2, b"r", orjson.dumps({"request_id": "r", "ts": 1.0}))
    core.impression(0, 3, b"42", orjson.dumps({"request_id": 42, "item_id": 7, "ts": 1.0, "features": {}}))
    core.click(0, 4, b"42", orjson.dumps({"request_id": "42", "item_id": "7", "ts": 2.0}))
    assert [r for r, _ in sink.dead] == ["malformed_json", "missing_item_id"]
    assert labels(sink) == [("42", 1)]


def test_a_duplicate_impression_is_ignored() -> None:
    sink = Recorder()
    core = JoinCore(cfg(), sink, {})
    imp(core, "r1", 100.0)
    imp(core, "r1", 100.0)
    advance(core, 111.0)
    assert [label for rid, label in labels(sink) if rid == "r1"] == [0]
    assert core.counters["duplicate_impressions"] == 1


def test_timers_are_rebuilt_from_recovered_state() -> None:
    """A new core on the state a crashed one left closes its windows and expires its keys."""
    sink = Recorder()
    state: dict = {}
    core = JoinCore(cfg(), sink, state)
    imp(core, "open", 100.0)
    imp(core, "clicked", 101.0)
    clk(core, "clicked", 102.0)
    clk(core, "waiting", 103.0)
    recovered = {k: orjson.loads(orjson.dumps(v)) for k, v in state.items()}  # as the changelog holds it
    sink2 = Recorder()
    core2 = JoinCore(cfg(), sink2, recovered)
    advance(core2, 150.0)
    assert labels(sink2) == [("filler-150.0", 1), ("open", 0)]
    assert [r for r, _ in sink2.dead] == ["unknown_impression"]
    assert set(recovered) == {join_key("filler-150.0", "i")}  # the rest closed and expired


# -- properties -------------------------------------------------------------------------------

PARTITIONS = 2


@st.composite
def streams(draw):
    """Impressions in event-time order per partition, each clicked 0-3 times with delays up to
    window + retention (later clicks would be unknown or late depending on arrival), plus
    clicks for impressions that never come. Returns the two topics' messages per partition."""
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.floats(0.0, 4.0), min_size=n, max_size=n))
    topics: dict[int, dict[str, list]] = {p: {"imp": [], "clk": []} for p in range(PARTITIONS)}
    t = 0.0
    clicks: list[tuple[float, int, str]] = []
    for i, gap in enumerate(gaps):
        t += gap
        rid = f"r{i}"
        p = draw(st.integers(0, PARTITIONS - 1))
        topics[p]["imp"].append((t, rid))
        delays = draw(st.lists(st.floats(0.0, 29.0), max_size=3))
        clicks += [(t + d, p, rid) for d in delays]
    for j in range(draw(st.integers(0, 3))):
        clicks.append((draw(st.floats(0.0, t + 5)), draw(st.integers(0, PARTITIONS - 1)), f"ghost{j}"))
    for ts, p, rid in sorted(clicks):
        topics[p]["clk"].append((ts, rid))
    return topics


def with_closing_events(topics):
    """The stream goes on: an impression and its click far later in every partition, so
    that every window closes (after a restart the watermark is rebuilt from new events)."""
    end = 1 + max([ts for t in topics.values() for msgs in t.values() for ts, _ in msgs] + [0.0])
    out = copy.deepcopy(topics)
    for p, t in out.items():
        t["imp"].append((end + 100.0, f"close{p}"))
        t["clk"].append((end + 100.0, f"close{p}"))
    return out


def reference(topics, policy: str = "drop") -> tuple[Counter, Counter]:
    """The specified output for in-order input (lateness 0): a positive for an impression
    with a click within its window; otherwise a negative once the final watermark passed the
    window, and for its clicks past the window the late-click policy; unknown clicks behind
    the final watermark are dead letters."""
    samples: Counter = Counter()
    dead: Counter = Counter()
    for p, t in topics.items():
        if not t["imp"] or not t["clk"]:
            wm = float("-inf")
        else:
            wm = min(max(ts for ts, _ in t["imp"]), max(ts for ts, _ in t["clk"]))
        shown = {rid: ts for ts, rid in t["imp"]}
        for ts, rid in t["imp"]:
            mine = [c for c, r in t["clk"] if r == rid]
            late = [c for c in mine if c > ts + W]
            if len(late) < len(mine):
                samples[(rid, 1)] += 1
                continue
            if ts + W < wm:
                samples[(rid, 0)] += 1
                if late and policy == "positive":
                    samples[(rid, 1)] += 1
            if policy == "dead_letter" and late:
                dead[("late_click", rid)] += len(late)
        for c, rid in t["clk"]:
            if rid not in shown and c < wm:
                dead[("unknown_impression", rid)] += 1
    return samples, dead


def interleave(topics, rng: random.Random) -> list[tuple[bool, int, str, float]]:
    """One possible consumption order: per-topic-partition order kept, everything else random."""
    queues = [[(name == "imp", p, rid, ts) for ts, rid in msgs]
              for p, t in topics.items() for name, msgs in t.items()]
    out = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out.append(q.pop(0))
    return out


def feed(core: JoinCore, event, offset: int) -> None:
    is_imp, p, rid, ts = event
    if is_imp:
        core.impression(p, offset, rid.encode(), orjson.dumps(impression(rid, "i", ts, {"C1": rid})))
    else:
        core.click(p, offset, rid.encode(), orjson.dumps(click(rid, "i", ts)))


POLICIES = st.sampled_from(["drop", "dead_letter", "positive"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topics=streams(), seed=st.integers(0, 2**32 - 1), policy=POLICIES)
def test_any_interleaving_of_the_topics_gives_the_specified_samples(topics, seed, policy) -> None:
    expected_samples, expected_dead = reference(topics, policy)
    for order_seed in (seed, seed + 1):
        sink = Recorder()
        core = JoinCore(cfg(late_clicks=policy), sink, {})
        for offset, event in enumerate(interleave(topics, random.Random(order_seed))):
            feed(core, event, offset)
        got = Counter((k.decode().split("\x1f")[0], label) for k, label, _ in sink.samples)
        assert got == expected_samples
        assert Counter((r, orjson.loads(v)["request_id"]) for r, v in sink.dead) == expected_dead


class FlakyBroker:
    """Outputs wait in per-topic queues and arrive (FIFO per topic, any order across topics)
    when `deliver` says; arrival acknowledges. A crash loses what has not arrived."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[str, list] = defaultdict(list)
        self.samples: list[tuple[bytes, int, bytes]] = []
        self.dead: list[tuple[str, bytes]] = []
        self.changelog: dict[bytes, list] = {}

    def sink(self) -> "FlakyBroker.Sink":
        return FlakyBroker.Sink(self)

    class Sink:
        def __init__(self, broker: "FlakyBroker") -> None:
            self.b = broker

        def sample(self, value, key, label, on_ack):
            self.b.queues["samples"].append((("s", key, label, value), on_ack))

        def dead_letter(self, value, reason, detail, source, on_ack):
            self.b.queues["dead"].append((("d", reason, value), on_ack))

        def persist(self, partition, key, state):
            self.b.queues["log"].append((("l", key, orjson.dumps(state) if state is not None else None), None))

    def deliver(self, n: int) -> None:
        for _ in range(n):
            live = [q for q in self.queues.values() if q]
            if not live:
                return
            message, on_ack = self.rng.choice(live).pop(0)
            if message[0] == "s":
                self.samples.append(message[1:])
            elif message[0] == "d":
                self.dead.append(message[1:])
            elif message[2] is None:
                self.changelog.pop(message[1], None)
            else:
                self.changelog[message[1]] = orjson.loads(message[2])
            if on_ack is not None:
                on_ack()

    def flush(self) -> None:
        self.deliver(10**9)

    def crash(self) -> None:
        self.queues.clear()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topics=streams(), seed=st.integers(0, 2**32 - 1), crashes=st.integers(1, 3), policy=POLICIES)
def test_crash_at_any_point_loses_nothing_and_duplicates_only_in_flight_samples(topics, seed, crashes,
                                                                               policy) -> None:
    """At-least-once: after crashes anywhere (input replayed from the last commit onto the
    state the changelog had received), the set of samples is exactly the specified one;
    a sample appears twice only as the very same message, re-emitted."""
    rng = random.Random(seed)
    topics = with_closing_events(topics)
    events = interleave(topics, rng)
    broker = FlakyBroker(rng)
    before_closing = next(i for i, e in enumerate(events) if e[2].startswith("close"))
    crash_points = sorted(rng.sample(range(before_closing), min(crashes, before_closing)))
    core = JoinCore(cfg(late_clicks=policy), broker.sink(), {})
    committed = 0  # the input position of the last commit
    i = 0
    while i < len(events):
        feed(core, events[i], i)
        for p, k, state in core.drain_deferred():  # what the agent does after each event
            core.sink.persist(p, k, state)
        broker.deliver(rng.randrange(4))
        i += 1
        if rng.random() < 0.2:  # a commit: what was sent is acknowledged, then the state it made durable
            for p, k in core.rotate_tombstones():
                core.sink.persist(p, k, None)
            broker.flush()
            while core._deferred:
                for p, k, state in core.drain_deferred():
                    core.sink.persist(p, k, state)
                broker.flush()
            committed = i
        if crash_points and i - 1 == crash_points[0]:
            crash_points.pop(0)
            broker.crash()
            recovered = copy.deepcopy(broker.changelog)
            core = JoinCore(cfg(late_clicks=policy), broker.sink(), recovered)
            i = committed
    for p, k, state in core.drain_deferred():
        core.sink.persist(p, k, state)
    broker.flush()

    expected_samples, expected_dead = reference(topics, policy)
    got = Counter((k.decode().split("\x1f")[0], label) for k, label, _ in broker.samples)
    assert set(got) == set(expected_samples)
    by_key = defaultdict(set)
    for k, label, value in broker.samples:
        by_key[(k, label)].add(value)
    assert all(len(values) == 1 for values in by_key.values())  # duplicates are identical
    assert {(r, orjson.loads(v)["request_id"]) for r, v in broker.dead} == set(expected_dead)


def test_prometheus_collector_reads_the_live_counters():
    from collections import Counter
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from stream.joiner import _JoinerCollector

    joiner = SimpleNamespace(stats=None)
    registry = CollectorRegistry()
    registry.register(_JoinerCollector(joiner))
    assert b"freshrec_joiner_events_total{" not in generate_latest(registry)  # nothing before the first event
    joiner.stats = SimpleNamespace(core=SimpleNamespace(counters=Counter({"impressions": 3, "dead_letter.bad_json": 1})))
    text = generate_latest(registry).decode()
    assert 'freshrec_joiner_events_total{kind="impressions"} 3.0' in text
    assert 'freshrec_joiner_events_total{kind="dead_letter.bad_json"} 1.0' in text
