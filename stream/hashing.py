"""Stable 64-bit ids for sparse features.

String ids hash with xxh64 (seed 0) reinterpreted as a signed int64, so the key is the same
in every process, language and run; integer ids are used as they are. Keys are never taken
modulo a table size: the Embedding Variable is a hash map, not an array.
"""

from __future__ import annotations

import xxhash

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_TWO64 = 1 << 64


def hash_string_id(value: str) -> int:
    h = xxhash.xxh64_intdigest(value.encode("utf-8"))
    return h - _TWO64 if h > INT64_MAX else h
