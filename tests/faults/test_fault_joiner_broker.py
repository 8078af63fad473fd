"""The broker stopped for a while under the joiner: a PRIVATE Tansu is SIGSTOPped for 8 s (it
accepts nothing and answers nothing, as a hung or partitioned broker would) and SIGCONTed
while a scripted stream of impressions and clicks is being produced and the real joiner
(`freshrec join`, a subprocess) joins it. The joiner waits and reconnects without exiting,
and emits exactly the samples of an uninterrupted run: every expected (request, label), no
other, and a sample more than once only as identical bytes (its documented guarantee is
at-least-once, duplicates identified by the `join_key` header).

Completion is read from the broker (the joiner's group has committed every input offset),
never timed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

from tests.faults.harness import START_TIMEOUT_S, report, topics_on, wait_for
from tests.test_joiner_kafka import Events, committed_all, read_topic, samples_by_request, stop, write_settings

STOPPED_S = 8.0
WINDOW_S = 10.0
BEFORE = 100  # requests joined before the stop
DURING = 300  # requests being produced when the broker is stopped (and after it is continued)
T0 = 1000.0
STEP_S = 0.5  # event time between consecutive impressions


def test_joiner_waits_out_a_stopped_broker_and_loses_nothing(tmp_path, private_stack, processes):
    kafka = topics_on(private_stack.kafka_bootstrap, partitions=2)
    group = f"joiner-{kafka.samples_topic}"
    stats_file = tmp_path / "stats.json"
    config = write_settings(tmp_path / "settings.yaml", kafka, window_s=WINDOW_S, commit_interval_s=0.5)
    joiner = processes.start(config, "join", name="joiner")
    ev = Events(kafka)
    truth: dict[str, float] = {}  # request -> impression time
    clicked: dict[str, float] = {}  # request -> first click time

    def produce(first: int, last: int, pause_s: float = 0.0) -> None:
        """Requests first..last-1 in event-time order: every third is clicked 2 s after its
        impression (a positive), every seventh (not a third) 15 s after it (too late: a negative)."""
        pending: list[tuple[float, str]] = []
        for i in range(first, last):
            rid, ts = f"r{i}", T0 + i * STEP_S
            while pending and pending[0][0] <= ts:
                tc, crid = pending.pop(0)
                ev.click(crid, tc)
                clicked.setdefault(crid, tc)
            ev.impression(rid, ts, I1=i)
            truth[rid] = ts
            if i % 3 == 0:
                pending.append((ts + 2.0, rid))
            elif i % 7 == 0:
                pending.append((ts + 15.0, rid))
            pending.sort()
            if pause_s:
                time.sleep(pause_s)
        for tc, crid in pending:
            ev.click(crid, tc)
            clicked.setdefault(crid, tc)

    try:
        produce(0, BEFORE)
        wait_for(lambda: committed_all(kafka, group, ev.sent), START_TIMEOUT_S, "the first requests committed",
                 [joiner])

        errors: list[BaseException] = []

        def during() -> None:
            try:
                produce(BEFORE, BEFORE + DURING, pause_s=0.02)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        thread = threading.Thread(target=during, daemon=True)
        thread.start()
        wait_for(lambda: len(truth) >= BEFORE + DURING // 5, 60, "producing to be under way", [joiner])

        broker = private_stack.kafka_pid
        os.kill(broker, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            while time.monotonic() - stopped_at < STOPPED_S:
                assert joiner.poll() is None, "the joiner exited while the broker was stopped"
                time.sleep(0.2)
            produced_at_stop = len(truth)
        finally:
            os.kill(broker, signal.SIGCONT)
        continued = time.monotonic()
        assert produced_at_stop < BEFORE + DURING, "producing was over before the broker was continued"

        # Recovery: the joiner joins events again (its counters move), then has committed every
        # input that was sent by the time the broker was continued.
        events_at_continue = json.loads(stats_file.read_text())["events"]
        wait_for(lambda: json.loads(stats_file.read_text())["events"] > events_at_continue, 120,
                 "the joiner to join events again", [joiner])
        resumed = time.monotonic() - continued
        wait_for(lambda: len(truth) > produced_at_stop, 60, "the producer to go on", [joiner])
        sent_after_continue = Counter(ev.sent)  # includes what was in flight at SIGCONT
        wait_for(lambda: committed_all(kafka, group, sent_after_continue), 120,
                 "the joiner to commit what was sent before and during the stop", [joiner])
        caught_up = time.monotonic() - continued

        thread.join(120)
        assert not thread.is_alive() and not errors, errors
        closing = ev.closing(5000.0)  # event time past every window, on every partition
        ev.close()
        wait_for(lambda: committed_all(kafka, group, ev.sent), 120, "every input offset committed", [joiner])
        all_done = time.monotonic() - continued
        assert joiner.poll() is None, "the joiner exited"
        assert stop(joiner) == 0, joiner.log_path.read_text()[-3000:]
    finally:
        ev.producer.close()

    expected = {(rid, int(rid in clicked and clicked[rid] <= ts + WINDOW_S)) for rid, ts in truth.items()}
    expected |= {(rid, 1) for rid in closing}
    assert len(truth) == BEFORE + DURING
    samples = samples_by_request(kafka)
    missing = expected - set(samples)
    assert not missing, f"{len(missing)} expected samples were never emitted: {sorted(missing)[:10]}"
    assert set(samples) == expected, f"unexpected samples: {sorted(set(samples) - expected)[:10]}"
    for key, messages in samples.items():
        assert len({(m.value, tuple(m.headers)) for m in messages}) == 1, f"{key} was emitted with different contents"
    assert read_topic(kafka, kafka.dead_letter_topic) == []
    duplicates = sum(len(ms) - 1 for ms in samples.values())
    stats = json.loads(stats_file.read_text())
    report(f"broker SIGSTOP {STOPPED_S:.0f} s under the joiner",
           f"joiner never exited; {events_at_continue} events joined at SIGCONT, joining again {resumed:.1f}s "
           f"and everything sent before/during the stop committed {caught_up:.1f}s after it, the whole "
           f"stream (paced) {all_done:.1f}s after it; "
           f"{len(expected)} samples expected, all emitted, {duplicates} identical duplicates, 0 lost "
           f"({stats['positives']} positives, {stats['negatives']} negatives)")
