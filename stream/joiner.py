"""The stream joiner: impressions ⨝ clicks within an attribution window -> labeled samples.

A faust-streaming app (`freshrec join`). One agent consumes the impressions and the clicks
topics together; both are keyed by request id and have the same partition count, so
partition p of each goes to the same worker with partition p of the state table (a faust
Table whose changelog is `<app_id>-join-state-changelog`). The join logic itself is
`JoinCore`, plain Python with no I/O, so that it can be tested and benchmarked alone.

Semantics, per (request_id, item_id) = one impression at event time T, window W:

- a click with event time <= T + W makes the impression positive: the sample (impression
  features + label 1 + ts=T) is emitted when the first such click is processed, once;
- otherwise the impression becomes a negative when its window closes: when the partition's
  watermark passes T + W. The watermark of partition p is
  min(max event time seen on impressions/p, max event time seen on clicks/p) - lateness,
  never decreasing; with `idle_input_s`, an input partition that delivered nothing for that
  long (wall time) stops holding it back. Windows close only as event time advances;
- a late click (event time past T + W, or processed after the window closed) is counted;
  for an impression without a click in its window, `late_clicks` says what else happens:
  drop, dead_letter, or positive (a second sample, label 1, after the negative; once);
- a click whose impression was not seen yet is held (up to `max_pending_clicks`) until the
  watermark passes the click's event time; the impression then should have arrived, and
  the click goes to the dead-letter topic as `unknown_impression`;
- a closed impression is remembered for `late_click_retention_s` more (event time).

With input in event-time order per topic partition (disorder up to the lateness), the
samples emitted do not depend on how the two topics interleave, nor on restarts. After a
restart the watermarks start over: windows close again once both inputs of a partition
deliver new events (or `idle_input_s` lets one of them go).

Guarantee (at-least-once; no loss; a duplicate only of a sample in flight at a crash):
- a state change that goes with an emission (positive, negative, late positive, dead-
  lettered held clicks) is written to the changelog only once the broker acknowledged the
  emission; a change without emission (a stored impression, a held click) at once;
- before faust commits input offsets it flushes the producer; that flush is extended so the
  state records of the emissions it acknowledged are sent and flushed too: the changelog is
  never behind the committed input;
- a deletion (expiry, resolved held clicks) reaches the changelog only two commits later,
  when every event before it is committed (a replayed late click must find its impression);
- a failed send ends the process at once, without a commit.
After a crash, faust restores the table from the changelog (read to its real end, see
`Joiner._complete_recovery`: Tansu under-reports end offsets) and replays the input from the
committed offsets, so every sample is emitted; a sample is emitted twice only when the crash
fell between the broker's acknowledgement of the sample and its state record reaching the
broker, and then as the same message. Exactly-once (Kafka transactions) is not used: the
Tansu broker rejects transactional produce, and the trainer reads read_uncommitted anyway.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
import shutil
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import orjson

from stream.config import JoinerConfig, KafkaConfig
from stream.events import BadEvent, join_key, parse_click, parse_impression

log = logging.getLogger(__name__)

TABLE = "join-state"
# State records of acknowledged emissions are sent at least this often when no events come.
DEFERRED_PERSIST_S = 0.1
# A key's state record waits for its newest emission; a key has at most a few (positive or
# negative, late positive, dead letters), so a few flush rounds make them all durable.
COMMIT_FLUSH_ROUNDS = 4
RECOVERY_CATCH_UP_TIMEOUT_S = 60.0

# State of one join key, a JSON list (the changelog's value): [code, partition, ...].
OPEN = 0  # [OPEN, p, T, features]: window open, no click yet
CLICKED = 1  # [CLICKED, p, T]: positive emitted
NEGATIVE = 2  # [NEGATIVE, p, T]: window closed without a click, negative emitted
LATE_POSITIVE = 3  # [LATE_POSITIVE, p, T]: negative, then a late positive emitted (policy "positive")
PENDING = 4  # [PENDING, p, [[click ts, click json, source], ...]]: clicks, impression not seen yet
OPEN_LATE = 5  # [OPEN_LATE, p, T, features]: open, a click past the window seen (policy "positive")

# Timer kinds, in the per-partition heap of (deadline, key, kind).
CLOSE, EXPIRE, UNKNOWN = 0, 1, 2


def changelog_topic(cfg: JoinerConfig) -> str:
    return f"{cfg.app_id}-{TABLE}-changelog"


class Sink(Protocol):
    """Where the core's output goes. `on_ack` must be called once the broker has the message."""

    def sample(self, value: bytes, key: bytes, label: int, on_ack: Callable[[], None]) -> None: ...

    def dead_letter(self, value: bytes, reason: str, detail: str, source: str,
                    on_ack: Callable[[], None] | None) -> None: ...

    def persist(self, partition: int, key: bytes, state: list | None) -> None: ...


class _Partition:
    __slots__ = ("imp_max", "clk_max", "imp_seen", "clk_seen", "wm", "heap")

    def __init__(self, now: float, heap: list) -> None:
        self.imp_max = self.clk_max = self.wm = -math.inf
        self.imp_seen = self.clk_seen = now
        self.heap = heap


class JoinCore:
    """The join, event by event. `state` is the table's local data (key -> state list);
    the core changes it in place and tells `sink` what to persist and emit."""

    def __init__(self, cfg: JoinerConfig, sink: Sink, state: MutableMapping[bytes, list], *,
                 impressions_topic: str = "impressions", clicks_topic: str = "clicks",
                 label: str = "label", event_time: str = "ts",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.sink = sink
        self.state = state
        self.label = label
        self.event_time = event_time
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._topics = (impressions_topic, clicks_topic)
        self._window = cfg.window_s
        self._lateness = cfg.allowed_lateness_s
        self._retention = cfg.late_click_retention_s
        self._parts: dict[int, _Partition] = {}
        self._index: dict[int, list] | None = None
        self._unacked: Counter[bytes] = Counter()
        # (partition, key) whose emissions were all acknowledged: their state is to be persisted.
        self._deferred: list[tuple[int, bytes]] = []
        # Deleted keys whose tombstones wait for two more commits (oldest first).
        self._tombstones: list[list[tuple[int, bytes]]] = [[], [], []]

    # -- events -------------------------------------------------------------------------------

    def impression(self, partition: int, offset: int, key: bytes | None, raw: bytes) -> None:
        c = self.counters
        c["impressions"] += 1
        try:
            imp = parse_impression(raw, self.cfg.max_event_bytes)
            self._check_key(key, imp.request_id)
        except BadEvent as e:
            self._reject(raw, e.reason, e.detail, self._source(0, partition, offset))
            return
        part = self._part(partition)
        k = join_key(imp.request_id, imp.item_id)
        st = self.state.get(k)
        t = imp.ts
        if st is not None and st[0] != PENDING:
            c["duplicate_impressions"] += 1
        else:
            self._new_impression(partition, part, k, t, imp.features, st[2] if st is not None else ())
        if t > part.imp_max:
            part.imp_max = t
        if self.cfg.idle_input_s is not None:
            part.imp_seen = self.clock()
        self._advance(partition, part)

    def click(self, partition: int, offset: int, key: bytes | None, raw: bytes) -> None:
        c = self.counters
        c["clicks"] += 1
        try:
            clk = parse_click(raw, self.cfg.max_event_bytes)
            self._check_key(key, clk.request_id)
        except BadEvent as e:
            self._reject(raw, e.reason, e.detail, self._source(1, partition, offset))
            return
        part = self._part(partition)
        k = join_key(clk.request_id, clk.item_id)
        st = self.state.get(k)
        tc = clk.ts
        if st is None:
            if tc < part.wm:  # its impression, if any, is already past: nothing will come
                self._reject(raw, "unknown_impression", "no impression seen for this click",
                             self._source(1, partition, offset))
            else:
                c["pending_clicks"] += 1
                self._set(partition, k, [PENDING, partition, [[tc, raw.decode(), self._source(1, partition, offset)]]])
                heapq.heappush(part.heap, (tc, k, UNKNOWN))
        else:
            self._known_click(partition, part, k, st, tc, raw, offset)
        if tc > part.clk_max:
            part.clk_max = tc
        if self.cfg.idle_input_s is not None:
            part.clk_seen = self.clock()
        self._advance(partition, part)

    def reset(self) -> None:
        """After a (re)assignment: watermarks restart, timers are rebuilt from the state."""
        self._parts.clear()
        self._index = None

    def watermark(self, partition: int) -> float:
        part = self._parts.get(partition)
        return part.wm if part is not None else -math.inf

    # -- the join -----------------------------------------------------------------------------

    def _new_impression(self, p: int, part: _Partition, k: bytes, t: float, features: dict,
                        held: list | tuple) -> None:
        c = self.counters
        close_at = t + self._window
        closed = close_at < part.wm
        if closed:
            c["late_impressions"] += 1
        in_window = [h for h in held if h[0] <= close_at]
        late = [h for h in held if h[0] > close_at]
        if len(in_window) > 1:
            c["duplicate_clicks"] += len(in_window) - 1
        policy = self.cfg.late_clicks
        if late:
            c["late_clicks"] += len(late)
            if policy == "dead_letter" and not in_window:
                for ts, text, source in late:  # keyed: the new state is recorded once they are sent
                    self._reject(text.encode(), "late_click", f"click at {ts} after window end {close_at}", source,
                                 key=k, partition=p)
        if in_window:
            self._emit(p, k, t, features, 1)
            self._change(p, k, [CLICKED, p, t])
            heapq.heappush(part.heap, (close_at, k, CLOSE))
        elif closed:
            self._emit(p, k, t, features, 0)
            if late and policy == "positive":
                self._emit(p, k, t, features, 1, late=True)
                self._change(p, k, [LATE_POSITIVE, p, t])
            else:
                self._change(p, k, self._negative(p, t, features))
            heapq.heappush(part.heap, (close_at + self._retention, k, EXPIRE))
        else:
            code = OPEN_LATE if late and policy == "positive" else OPEN
            self._set(p, k, [code, p, t, features])
            heapq.heappush(part.heap, (close_at, k, CLOSE))

    def _known_click(self, p: int, part: _Partition, k: bytes, st: list, tc: float, raw: bytes,
                     offset: int) -> None:
        c = self.counters
        code = st[0]
        if code == PENDING:
            held = st[2]
            source = self._source(1, p, offset)
            if any(h[2] == source for h in held):  # the same message again: replayed after a restart
                c["replayed_clicks"] += 1
                return
            if len(held) >= self.cfg.max_pending_clicks:
                self._reject(raw, "too_many_pending_clicks", f"{len(held)} clicks already wait for this impression",
                             source)
                return
            c["pending_clicks"] += 1
            earliest = held[0][0]
            held = sorted([*held, [tc, raw.decode(), source]], key=lambda h: h[0])
            self._set(p, k, [PENDING, p, held])
            if tc < earliest:
                heapq.heappush(part.heap, (tc, k, UNKNOWN))
            return
        t = st[2]
        close_at = t + self._window
        policy = self.cfg.late_clicks
        if code == OPEN or code == OPEN_LATE:
            if tc <= close_at:
                self._emit(p, k, t, st[3], 1)
                self._change(p, k, [CLICKED, p, t])
                return
            c["late_clicks"] += 1
            if policy == "dead_letter":
                self._reject(raw, "late_click", f"click at {tc} after window end {close_at}", self._source(1, p, offset))
            elif policy == "positive" and code == OPEN:
                self._set(p, k, [OPEN_LATE, p, t, st[3]])
        elif code == CLICKED:
            c["duplicate_clicks" if tc <= close_at else "late_clicks"] += 1
        elif code == NEGATIVE:
            c["late_clicks"] += 1
            if policy == "dead_letter":
                self._reject(raw, "late_click", f"click at {tc}, window closed at {close_at}", self._source(1, p, offset))
            elif policy == "positive":
                self._emit_late_positive(p, k, t)
        else:  # LATE_POSITIVE
            c["late_clicks"] += 1

    def _emit_late_positive(self, p: int, k: bytes, t: float) -> None:
        self._emit(p, k, t, self.state[k][3], 1, late=True)
        self._change(p, k, [LATE_POSITIVE, p, t])

    def _negative(self, p: int, t: float, features: dict) -> list:
        """The state after a negative; with policy "positive" it keeps the features for a late positive."""
        return [NEGATIVE, p, t, features] if self.cfg.late_clicks == "positive" else [NEGATIVE, p, t]

    def _advance(self, p: int, part: _Partition) -> None:
        i, c = part.imp_max, part.clk_max
        idle = self.cfg.idle_input_s
        if idle is not None:
            now = self.clock()
            if now - part.imp_seen > idle:
                i = math.inf
            if now - part.clk_seen > idle:
                c = math.inf
        m = i if i < c else c
        if m == math.inf:
            return
        wm = m - self._lateness
        if wm <= part.wm:
            return
        part.wm = wm
        heap = part.heap
        state = self.state
        while heap and heap[0][0] < wm:
            deadline, k, kind = heapq.heappop(heap)
            st = state.get(k)
            if st is None:
                continue
            code = st[0]
            if kind == CLOSE:
                if code in (OPEN, OPEN_LATE, CLICKED) and st[2] + self._window == deadline:
                    self._close(p, part, k, st)
            elif kind == EXPIRE:
                if code in (CLICKED, NEGATIVE, LATE_POSITIVE) and st[2] + self._window + self._retention == deadline:
                    self.counters["expired"] += 1
                    self._change(p, k, None)
                    if k not in self._unacked:
                        self._tombstones[-1].append((p, k))
            elif code == PENDING and st[2][0][0] == deadline:
                for _ts, text, source in st[2]:
                    self._reject(text.encode(), "unknown_impression", "no impression seen by the watermark", source,
                                 key=k, partition=p)
                self._change(p, k, None)

    def _close(self, p: int, part: _Partition, k: bytes, st: list) -> None:
        t = st[2]
        code = st[0]
        if code != CLICKED:
            self._emit(p, k, t, st[3], 0)
            if code == OPEN_LATE:
                self._emit(p, k, t, st[3], 1, late=True)
                self._change(p, k, [LATE_POSITIVE, p, t])
            else:
                self._change(p, k, self._negative(p, t, st[3]))
        heapq.heappush(part.heap, (t + self._window + self._retention, k, EXPIRE))

    # -- output and state ---------------------------------------------------------------------

    def _emit(self, p: int, k: bytes, t: float, features: dict, label: int, late: bool = False) -> None:
        c = self.counters
        c["late_positives" if late else ("positives" if label else "negatives")] += 1
        value = orjson.dumps({**features, self.label: label, self.event_time: t})
        self._unacked[k] += 1
        self.sink.sample(value, k, label, lambda: self._acked(p, k))

    def _reject(self, raw: bytes, reason: str, detail: str, source: str, *, key: bytes | None = None,
                partition: int = 0) -> None:
        self.counters[f"dead_letter.{reason}"] += 1
        on_ack = None
        if key is not None:
            self._unacked[key] += 1
            on_ack = lambda: self._acked(partition, key)  # noqa: E731
        self.sink.dead_letter(raw, reason, detail, source, on_ack)

    def _acked(self, p: int, k: bytes) -> None:
        left = self._unacked[k] - 1
        if left > 0:
            self._unacked[k] = left
            return
        del self._unacked[k]
        self._deferred.append((p, k))

    def drain_deferred(self) -> list[tuple[int, bytes, list]]:
        """The state records whose emissions were acknowledged since the last call, as they
        are now (a key with a newer unacknowledged emission waits for that one; a key that
        is gone waits for its tombstone's turn, see `rotate_tombstones`)."""
        out = []
        for p, k in self._deferred:
            if k in self._unacked:
                continue
            st = self.state.get(k)
            if st is None:
                self._tombstones[-1].append((p, k))
            else:
                out.append((p, k, st))
        self._deferred.clear()
        return out

    def rotate_tombstones(self) -> list[tuple[int, bytes]]:
        """Deletions that may reach the changelog now: call it as each offset commit starts.

        A key is deleted (expired, or its held clicks dead-lettered) when the watermark
        passes; the events before that one may still be replayed after a crash, and must
        then find the key as they did the first time (a replayed late click would otherwise
        be an unknown impression). So a tombstone is sent only once the event that decided
        it is surely committed: two commits later."""
        ready = self._tombstones.pop(0)
        self._tombstones.append([])
        return [(p, k) for p, k in ready if k not in self.state]

    def _change(self, p: int, k: bytes, st: list | None) -> None:
        """A change that records an emission: persisted when the emission is acknowledged."""
        if st is None:
            self.state.pop(k, None)
        else:
            self.state[k] = st

    def _set(self, p: int, k: bytes, st: list | None) -> None:
        """A change without emission: persisted now (or with a pending acknowledgement)."""
        self._change(p, k, st)
        if k not in self._unacked:
            self.sink.persist(p, k, st)

    def _check_key(self, key: bytes | None, request_id: str) -> None:
        if not self.cfg.require_key:
            return
        if key is None:
            raise BadEvent("unkeyed", "events must be keyed by their request id")
        if key != request_id.encode():
            raise BadEvent("key_mismatch", f"key {key[:64]!r} is not the request id {request_id[:64]!r}")

    def _source(self, which: int, partition: int, offset: int) -> str:
        return f"{self._topics[which]}/{partition}/{offset}"

    def _part(self, p: int) -> _Partition:
        part = self._parts.get(p)
        if part is None:
            if self._index is None:
                self._index = self._timers_from_state()
            part = self._parts[p] = _Partition(self.clock(), self._index.pop(p, []))
        return part

    def _timers_from_state(self) -> dict[int, list]:
        """Window closes, expiries and held clicks of the recovered state, per partition."""
        w, r = self._window, self._retention
        heaps: dict[int, list] = {}
        for k, st in self.state.items():
            code = st[0]
            if code in (OPEN, OPEN_LATE, CLICKED):
                entry = (st[2] + w, k, CLOSE)
            elif code == PENDING:
                entry = (st[2][0][0], k, UNKNOWN)
            else:
                entry = (st[2] + w + r, k, EXPIRE)
            heaps.setdefault(st[1], []).append(entry)
        for heap in heaps.values():
            heapq.heapify(heap)
        return heaps


# -- the faust app ------------------------------------------------------------------------------


class _FaustSink:
    """Collects what the core emits; the agent sends it through faust's producer (the one
    faust flushes before committing offsets). Changelog records are sent to the table's
    changelog topic directly, in the same order as the state changes they record."""

    def __init__(self, kafka: KafkaConfig, changelog: str) -> None:
        self.kafka = kafka
        self.changelog = changelog
        # (topic, key, value, partition, headers, on_ack)
        self.outbox: list[tuple[str, bytes | None, bytes | None, int | None, list | None, Any]] = []

    def sample(self, value: bytes, key: bytes, label: int, on_ack: Callable[[], None]) -> None:
        self.outbox.append((self.kafka.samples_topic, None, value, None, [("join_key", key)], on_ack))

    def dead_letter(self, value: bytes, reason: str, detail: str, source: str,
                    on_ack: Callable[[], None] | None) -> None:
        headers = [("reason", reason.encode()), ("detail", detail[:500].encode()), ("source", source.encode())]
        self.outbox.append((self.kafka.dead_letter_topic, None, value, None, headers, on_ack))

    def persist(self, partition: int, key: bytes, state: list | None) -> None:
        self.outbox.append((self.changelog, key, None if state is None else orjson.dumps(state), partition,
                            None, None))


def _fatal(exc: BaseException) -> None:
    """A send that failed for good: stop now, without committing offsets past it (a graceful
    stop would commit them, losing the message); the restart replays from the last commit."""
    log.critical("a send failed, exiting without commit so that it is replayed: %r", exc)
    logging.shutdown()
    os._exit(70)


def _on_sent(on_ack: Callable[[], None] | None) -> Callable[[asyncio.Future], None]:
    def done(fut: asyncio.Future) -> None:
        if fut.cancelled():
            _fatal(asyncio.CancelledError())
        elif fut.exception() is not None:
            _fatal(fut.exception())
        elif on_ack is not None:
            on_ack()
    return done


def _check_sent(fut: asyncio.Future) -> None:
    if fut.cancelled() or fut.exception() is not None:
        _fatal(fut.exception() if not fut.cancelled() else asyncio.CancelledError())


def _ssl_context(kafka: KafkaConfig) -> ssl.SSLContext | None:
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=kafka.ssl_cafile)
    if kafka.ssl_certfile:
        context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
    return context


def _aiokafka_kwargs(kafka: KafkaConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers.split(","),
                          "security_protocol": kafka.security_protocol}
    context = _ssl_context(kafka)
    if context is not None:
        kw["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL"):
        kw.update(sasl_mechanism=kafka.sasl_mechanism or "PLAIN", sasl_plain_username=kafka.sasl_username,
                  sasl_plain_password=kafka.sasl_password)
    return kw


def _credentials(kafka: KafkaConfig) -> Any:
    import faust

    context = _ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password,
                                     mechanism=kafka.sasl_mechanism or "PLAIN", ssl_context=context)
    return faust.SSLCredentials(context) if context is not None else None


def _monitor(on_commit: Callable[[], None]) -> Any:
    """faust's monitor, told about each offset commit (its `on_tp_commit` hook)."""
    from faust.sensors.monitor import Monitor

    class CommitMonitor(Monitor):
        def on_tp_commit(self, tp_offsets: Any) -> None:
            super().on_tp_commit(tp_offsets)
            on_commit()

    return CommitMonitor()


class _JoinerCollector:
    """Prometheus view of the joiner's counters, read when scraped (no second bookkeeping)."""

    def __init__(self, joiner) -> None:
        self.joiner = joiner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        events = CounterMetricFamily("freshrec_joiner_events", "Joiner events by kind: impressions, clicks, "
                                     "positives, negatives, late clicks, dead_letter.<reason>, ...", labels=["kind"])
        stats = self.joiner.stats
        for kind, count in (stats.core.counters.items() if stats is not None else ()):
            events.add_metric([kind], count)
        yield events


class Stats:
    """Counters plus the events processed and when the first and last were (wall time)."""

    def __init__(self, core: JoinCore) -> None:
        self.core = core
        self.events = 0
        self.first_event_at: float | None = None
        self.last_event_at: float | None = None

    def snapshot(self) -> dict:
        return {"events": self.events, "first_event_at": self.first_event_at,
                "last_event_at": self.last_event_at, **dict(sorted(self.core.counters.items()))}

    def write(self, path: str | None) -> None:
        snap = self.snapshot()
        log.info("joiner: %s", " ".join(f"{k}={v}" for k, v in snap.items() if not k.endswith("_at")))
        if path:
            tmp = Path(f"{path}.tmp")
            tmp.write_bytes(orjson.dumps(snap))
            tmp.replace(path)


class Joiner:
    """The faust app around a `JoinCore`. `run()` blocks until SIGTERM/SIGINT."""

    def __init__(self, kafka: KafkaConfig, cfg: JoinerConfig, *, label: str = "label",
                 event_time: str = "ts") -> None:
        import faust

        self.kafka = kafka
        self.cfg = cfg
        self.datadir = tempfile.mkdtemp(prefix="freshrec-joiner-")
        session = cfg.session_timeout_s
        self.app = app = faust.App(
            cfg.app_id,
            monitor=_monitor(self._on_commit),
            broker=[f"kafka://{b}" for b in kafka.bootstrap_servers.split(",")],
            broker_credentials=_credentials(kafka),
            store="memory://",
            datadir=self.datadir,
            topic_partitions=kafka.partitions,
            topic_replication_factor=1,
            table_standby_replicas=0,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            # Batches, not a produce request per message (faust's default linger is 0): the
            # request count, not the bytes, is what limits a Python producer.
            producer_linger=0.01,
            producer_max_batch_size=256 * 1024,
            consumer_max_fetch_size=4 * 1024 * 1024,
            stream_buffer_maxsize=16384,
            broker_session_timeout=session,
            broker_heartbeat_interval=min(3.0, session / 4),
            broker_rebalance_timeout=session,
            broker_commit_interval=cfg.commit_interval_s,
            key_serializer="raw",
            value_serializer="raw",
        )
        # bytes keys: "raw" on the changelog; values (state lists) as JSON.
        self.table = app.Table(TABLE, partitions=kafka.partitions, key_type=bytes)
        self.sink = _FaustSink(kafka, changelog_topic(cfg))
        self._sending = asyncio.Lock()
        self.core: JoinCore | None = None
        self._label, self._event_time = label, event_time
        self.stats: Stats | None = None
        source = app.topic(kafka.impressions_topic, kafka.clicks_topic, key_type=bytes, value_type=bytes,
                           key_serializer="raw", value_serializer="raw")
        app.agent(source, name="freshrec-join")(self._agent)
        app.timer(cfg.stats_interval_s)(self._report)
        app.timer(DEFERRED_PERSIST_S)(self._send_deferred)
        app.on_partitions_assigned.connect(self._on_assigned)
        self.table.on_recover(self._complete_recovery)
        self._hook_commit_flush()

    async def _complete_recovery(self) -> None:
        """Read the changelog past where faust's recovery stopped, up to its real end.

        faust recovers a table up to the end offsets the broker reports (ListOffsets). The
        Tansu broker reports the base offset of the last record batch there, so faust misses
        that batch: the newest state records (measured: a CLICKED record lost, the window
        then closed again with a negative). Fetch responses carry the right high watermark,
        so the rest is read here, before the streams resume; on Kafka there is nothing left."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition

        topic = changelog_topic(self.cfg)
        tps = [TopicPartition(tp.topic, tp.partition) for tp in self.app.assignor.assigned_actives()
               if tp.topic == topic]
        if not tps:
            return
        recovered = self.app.tables.recovery.active_highwaters
        consumer = AIOKafkaConsumer(enable_auto_commit=False, **_aiokafka_kwargs(self.kafka))
        await consumer.start()
        applied = 0
        try:
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, max(0, (recovered.get(tp) or -1) + 1))
            state = self.table.data.data
            deadline = time.monotonic() + RECOVERY_CATCH_UP_TIMEOUT_S
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for m in records:
                        if m.value is None:
                            state.pop(m.key, None)
                        else:
                            state[m.key] = orjson.loads(m.value)
                        applied += 1
                ends = [consumer.highwater(tp) for tp in tps]
                if None not in ends and all([await consumer.position(tp) >= end for tp, end in zip(tps, ends)]):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not read {topic} to its end within {RECOVERY_CATCH_UP_TIMEOUT_S}s")
        finally:
            await consumer.stop()
        if applied:
            log.info("recovery: %d changelog records past the reported end offsets applied", applied)

    def _hook_commit_flush(self) -> None:
        """Before committing input offsets faust flushes its producer: every message sent so
        far is then acknowledged, and the state records of those emissions become due. They
        are sent and flushed too, before the commit: the state must never be older than the
        committed input (a committed click whose CLICKED record was lost would let the
        window close with a negative after a restart)."""
        producer = self.app.producer
        flush = producer.flush

        async def flush_for_commit() -> None:
            await flush()
            for _ in range(COMMIT_FLUSH_ROUNDS):
                await asyncio.sleep(0)  # let acknowledgement callbacks run
                if self.core is None or not self.core._deferred or producer._producer is None:
                    break
                await self._send()
                await flush()

        producer.flush = flush_for_commit

    def _on_commit(self) -> None:
        """After each offset commit: tombstones decided two commits ago may go out now."""
        if self.core is not None:
            for p, k in self.core.rotate_tombstones():
                self.sink.persist(p, k, None)

    def _ensure_core(self) -> JoinCore:
        if self.core is None:
            self.core = JoinCore(self.cfg, self.sink, self.table.data.data,
                                 impressions_topic=self.kafka.impressions_topic,
                                 clicks_topic=self.kafka.clicks_topic, label=self._label,
                                 event_time=self._event_time)
            self.stats = Stats(self.core)
        return self.core

    async def _on_assigned(self, app: Any, assigned: Any = None, **_kw: Any) -> None:
        if self.core is not None:
            self.core.reset()

    async def _agent(self, stream: Any) -> None:
        core = self._ensure_core()
        stats = self.stats
        assert stats is not None
        impressions = self.kafka.impressions_topic
        outbox = self.sink.outbox
        deferred = core._deferred
        async for event in stream.events():
            m = event.message
            if m.topic == impressions:
                core.impression(m.partition, m.offset, m.key, m.value)
            else:
                core.click(m.partition, m.offset, m.key, m.value)
            now = time.time()
            if stats.first_event_at is None:
                stats.first_event_at = now
            stats.last_event_at = now
            stats.events += 1
            if outbox or deferred:
                await self._send()

    async def _send(self) -> None:
        """Send the outbox, then the state records of acknowledged emissions. One sender at a
        time (the agent, or the timer when no events come), so that changelog records reach
        the producer in the order of the state changes."""
        async with self._sending:
            # faust's aiokafka producer itself (faust's wrapper costs more than the send):
            # the one faust flushes before it commits offsets.
            send = self.app.producer._producer.send
            outbox = self.sink.outbox
            core = self.core
            assert core is not None
            if core._deferred:
                for p, k, st in core.drain_deferred():
                    self.sink.persist(p, k, st)
            while outbox:
                batch, outbox[:] = list(outbox), []
                for topic, key, value, partition, headers, on_ack in batch:
                    try:
                        fut = await send(topic, value, key=key, partition=partition, headers=headers)
                    except Exception as e:  # noqa: BLE001 - whatever it is, nothing may be committed
                        _fatal(e)
                    fut.add_done_callback(_check_sent if on_ack is None else _on_sent(on_ack))

    async def _send_deferred(self) -> None:
        if self.core is not None and (self.core._deferred or self.sink.outbox):
            await self._send()

    async def _report(self) -> None:
        if self.stats is not None:
            self.stats.write(self.cfg.stats_file)

    def prepare_topics(self) -> None:
        """Create the topics (the changelog with the inputs' partition count) and check that
        the inputs and the changelog are co-partitioned."""
        from kafka import KafkaConsumer

        from stream.topics import ensure_topics

        k = self.kafka
        ensure_topics(k, [k.impressions_topic, k.clicks_topic, k.samples_topic, k.dead_letter_topic,
                          changelog_topic(self.cfg)], k.partitions)
        consumer = KafkaConsumer(**k.client_kwargs())
        try:
            counts = {t: len(consumer.partitions_for_topic(t) or ())
                      for t in (k.impressions_topic, k.clicks_topic, changelog_topic(self.cfg))}
        finally:
            consumer.close()
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"the joiner's topics must have the same partition count: {counts}")

    def run(self) -> int:
        import faust

        self.prepare_topics()
        if self.cfg.metrics_port:
            from prometheus_client import REGISTRY, start_http_server

            REGISTRY.register(_JoinerCollector(self))
            start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_host)
        worker = faust.Worker(self.app, loglevel=logging.getLevelName(logging.getLogger().level),
                              quiet=True, redirect_stdouts=False, override_logging=False)
        try:
            worker.execute_from_commandline()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
        else:
            code = 0
        finally:
            if self.stats is not None:
                self.stats.write(self.cfg.stats_file)
            shutil.rmtree(self.datadir, ignore_errors=True)
        return code
