"""Stable 64-bit ids for sparse features.

String ids hash with xxh64 (seed 0) reinterpreted as a signed int64, so the key is the same
in every process, language and run; integer ids are used as they are. Keys are never taken
modulo a table size: the Embedding Variable is a hash map, not an array.
"""

from __future__ import annotations

import numpy as np
import xxhash
from numba import njit

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_TWO64 = 1 << 64


def hash_string_id(value: str) -> int:
    h = xxhash.xxh64_intdigest(value.encode("utf-8"))
    return h - _TWO64 if h > INT64_MAX else h


def hash_string_ids(values: list[str]) -> np.ndarray:
    """`hash_string_id` of each string, as int64, in one compiled pass.

    The ingest hashes ~13k ids per Criteo micro-batch; one Python call (or even one dict
    lookup in a cache of known ids) per id was most of the JSON decode time. Here the strings
    are joined by NUL into one UTF-8 buffer (one `str.join`, one `encode`) and xxh64 runs over
    each segment. A string that itself holds a NUL splits its segment; the segment count then
    differs from the number of strings and they are hashed one by one instead."""
    if not values:
        return np.zeros(0, dtype=np.int64)
    out = np.empty(len(values), dtype=np.uint64)
    if _xxh64_segments(np.frombuffer("\0".join(values).encode("utf-8"), dtype=np.uint8), out):
        return out.view(np.int64)
    return np.fromiter(map(hash_string_id, values), dtype=np.int64, count=len(values))


_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


@njit(cache=True, inline="always")
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(cache=True, inline="always")
def _read(buf: np.ndarray, at: int, width: int) -> np.uint64:
    """`width` bytes at `at`, little-endian."""
    v = np.uint64(0)
    for i in range(width):
        v |= np.uint64(buf[at + i]) << np.uint64(8 * i)
    return v


@njit(cache=True, inline="always")
def _round(acc: np.uint64, lane: np.uint64) -> np.uint64:
    return _rotl(acc + lane * _P2, 31) * _P1


@njit(cache=True, inline="always")
def _merge_round(acc: np.uint64, v: np.uint64) -> np.uint64:
    return (acc ^ _round(np.uint64(0), v)) * _P1 + _P4


@njit(cache=True)
def _xxh64(buf: np.ndarray, start: int, end: int) -> np.uint64:
    """XXH64 with seed 0 of buf[start:end] (the reference algorithm, xxhash.h)."""
    p = start
    if end - start >= 32:
        v1, v2, v3, v4 = _P1 + _P2, _P2, np.uint64(0), np.uint64(0) - _P1
        while p + 32 <= end:
            v1 = _round(v1, _read(buf, p, 8))
            v2 = _round(v2, _read(buf, p + 8, 8))
            v3 = _round(v3, _read(buf, p + 16, 8))
            v4 = _round(v4, _read(buf, p + 24, 8))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge_round(_merge_round(_merge_round(_merge_round(h, v1), v2), v3), v4)
    else:
        h = _P5
    h += np.uint64(end - start)
    while p + 8 <= end:
        h = _rotl(h ^ _round(np.uint64(0), _read(buf, p, 8)), 27) * _P1 + _P4
        p += 8
    if p + 4 <= end:
        h = _rotl(h ^ (_read(buf, p, 4) * _P1), 23) * _P2 + _P3
        p += 4
    while p < end:
        h = _rotl(h ^ (np.uint64(buf[p]) * _P5), 11) * _P1
        p += 1
    h = (h ^ (h >> np.uint64(33))) * _P2
    h = (h ^ (h >> np.uint64(29))) * _P3
    return h ^ (h >> np.uint64(32))


@njit(cache=True)
def _xxh64_segments(buf: np.ndarray, out: np.ndarray) -> bool:
    """XXH64 of each NUL-separated segment of buf into out; False if they are not len(out)."""
    n, start = 0, 0
    for i in range(len(buf) + 1):
        if i == len(buf) or buf[i] == 0:
            if n == len(out):
                return False
            out[n] = _xxh64(buf, start, i)
            n += 1
            start = i + 1
    return n == len(out)
