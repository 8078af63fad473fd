"""Raw events: impressions and clicks, as users have them, before the joiner labels them.

On the wire both are JSON objects, keyed by the request id (UTF-8 of its string form):

    impression  {"request_id": "r1", "item_id": "i9", "ts": 1700000000.25, "features": {...}}
    click       {"request_id": "r1", "item_id": "i9", "ts": 1700000004.0}

`request_id` and `item_id` are non-empty strings or integers (an integer and its decimal
string are the same id); `ts` is the event time in seconds (finite number); `features` is
the object the sample is made of (the schema's feature fields). The key is what makes an
impression and its clicks meet: with the same key and the same partition count, every
partitioner sends them to the same partition of their topics.

`parse_impression` / `parse_click` turn untrusted bytes into events or raise `BadEvent`
with a short reason (the dead-letter topic's `reason` header). `impressions_and_clicks`
turns the synthetic stream (whose labels are drawn from the hidden click model) into the
raw events that would have produced it: one impression per sample, and for each positive a
click delayed by a random amount, in event-time order.
"""

from __future__ import annotations

import heapq
import math
import random
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import count


from stream.producer import Keyed
from stream.sample import InvalidSample, parse_object

REQUEST_ID = "request_id"
ITEM_ID = "item_id"
TS = "ts"
FEATURES = "features"


class BadEvent(InvalidSample):
    """An impression or click that cannot be joined; `reason` is a stable, low-cardinality code."""


@dataclass(frozen=True, slots=True)
class Impression:
    request_id: str
    item_id: str
    ts: float
    features: dict


@dataclass(frozen=True, slots=True)
class Click:
    request_id: str
    item_id: str
    ts: float


def join_key(request_id: str, item_id: str) -> bytes:
    """The joiner's state key: one impression (request, item)."""
    return f"{request_id}\x1f{item_id}".encode()


def _id(obj: dict, name: str) -> str:
    v = obj.get(name)
    if v is None or v == "":
        raise BadEvent(f"missing_{name}")
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise BadEvent(f"bad_{name}", f"{name}={v!r} is not a string or integer id")


def _ts(obj: dict) -> float:
    v = obj.get(TS)
    if v is None:
        raise BadEvent("missing_event_time", TS)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadEvent("bad_event_time", f"{TS}={v!r}")
    return float(v)


def parse_impression(raw: bytes, max_bytes: int = 64 * 1024) -> Impression:
    obj = parse_object(raw, max_bytes, BadEvent)
    request_id, item_id, ts = _id(obj, REQUEST_ID), _id(obj, ITEM_ID), _ts(obj)
    features = obj.get(FEATURES)
    if features is None:
        raise BadEvent("missing_features", FEATURES)
    if not isinstance(features, dict):
        raise BadEvent("bad_features", f"{FEATURES} is a {type(features).__name__}, not an object")
    return Impression(request_id, item_id, ts, features)


def parse_click(raw: bytes, max_bytes: int = 64 * 1024) -> Click:
    obj = parse_object(raw, max_bytes, BadEvent)
    return Click(_id(obj, REQUEST_ID), _id(obj, ITEM_ID), _ts(obj))


def impression(request_id: str, item_id: str, ts: float, features: dict) -> dict:
    return {REQUEST_ID: request_id, ITEM_ID: item_id, TS: ts, FEATURES: features}


def click(request_id: str, item_id: str, ts: float) -> dict:
    return {REQUEST_ID: request_id, ITEM_ID: item_id, TS: ts}


def impressions_and_clicks(
    events: Iterable,
    impressions_topic: str,
    clicks_topic: str,
    *,
    label: str = "label",
    event_time: str = "ts",
    click_delay_s: float = 5.0,
    repeat_click_rate: float = 0.05,
    items_per_request: int = 4,
    request_prefix: str | None = None,
    seed: int = 0,
) -> Iterator[Keyed]:
    """Raw events for a stream of labeled samples (e.g. `SyntheticStream.events()`).

    Every sample becomes an impression (its features, its event time); a positive one also
    becomes a click `Exponential(click_delay_s)` seconds later, and with `repeat_click_rate`
    a second click after another such delay. Consecutive samples form one request of
    `items_per_request` items. Messages come out in event-time order: a click is yielded
    just before the first impression that is later than it (the rest when the input ends).
    Clicks later than the joiner's window are realistic: they make a positive a negative.
    """
    rng = random.Random(seed)
    prefix = request_prefix if request_prefix is not None else f"{seed}-{uuid.uuid4().hex[:8]}-"
    pending: list[tuple[float, int, Keyed]] = []
    order = count()
    for index, item in enumerate(events):
        sample = item.sample if hasattr(item, "sample") else item
        ts = float(sample[event_time])
        while pending and pending[0][0] <= ts:
            yield heapq.heappop(pending)[2]
        request_id, item_id = f"{prefix}{index // items_per_request}", str(index % items_per_request)
        key = request_id.encode()
        features = {k: v for k, v in sample.items() if k != label and k != event_time}
        yield Keyed(impressions_topic, key, impression(request_id, item_id, ts, features))
        if sample.get(label) == 1:
            at = ts + rng.expovariate(1.0 / click_delay_s) if click_delay_s > 0 else ts
            heapq.heappush(pending, (at, next(order), Keyed(clicks_topic, key, click(request_id, item_id, at))))
            if rng.random() < repeat_click_rate:
                again = at + (rng.expovariate(1.0 / click_delay_s) if click_delay_s > 0 else 0.0)
                heapq.heappush(pending, (again, next(order),
                                         Keyed(clicks_topic, key, click(request_id, item_id, again))))
    while pending:
        yield heapq.heappop(pending)[2]


def simulated_clock(start: float, events_per_s: float) -> Callable[[], float]:
    """Event time that advances `1 / events_per_s` per call: a stream of any length can
    span minutes of event time (so windows close) however fast it is produced."""
    ticks = count()
    return lambda: start + next(ticks) / events_per_s
