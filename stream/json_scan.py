"""JSON samples straight from a micro-batch's bytes to columns, in one compiled pass.

Why: parsing each message into a msgspec struct and reading the columns off the structs cost
~5 µs per Criteo message (41 fields), most of the ingest process's CPU, and on two cores the
ingest competes with the training step for the machine. This scanner reads the JSON that
producers write, field by field, into preallocated columns, and hashes each string id from
the bytes it is written in: no Python object per message, per field or per id.

It accepts a strict subset of what `SampleCodec.decode` (the definition) accepts, and reads
it to the same values; a message outside the subset is handed back untouched, and the
msgspec and per-message paths decide it (and give the reason if it is refused). The subset:

- one JSON object, with JSON whitespace allowed between tokens;
- keys that are schema fields, written without escapes, each at most once; the label and
  the event time present;
- label: the integer 0 or 1 (or -0); event time: a number; dense values: numbers or null,
  within float32 unless the feature takes log1p;
- string ids: strings of printable ASCII, no escapes; integer ids: integers of at most 18
  digits; multi-valued features: lists of those, at most `max_ids`; a sparse null is absent.

Escapes, non-ASCII text, unknown or repeated fields, values of another type, longer integers
and anything malformed go the other way. Numbers are converted exactly: an integer literal
of at most 18 digits by one int64-to-double conversion, a decimal of at most 15 significant
digits times a power of ten within 10^+-22 by one IEEE operation (Clinger's fast path; both
operands exact, so one rounding); any other number, such as a 17-digit timestamp, by the C
library's `strtod` on its text (correctly rounded, as orjson, msgspec and Python's float()
are; ~150 ns). A C library whose `strtod` does not read "0.5" as 0.5 (another locale's
decimal point) leaves every message to the other paths.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

from stream.columns import FLOAT32_MAX, MessageBuffer, SampleColumns
from stream.hashing import _xxh64
from stream.schema import DenseTransform, FeatureSchema

# What a field holds (`_scan`'s `kinds`)
LABEL, TIME, DENSE, STRING_ID, INT_ID, STRING_IDS, INT_IDS = range(7)

# double strtod(const char *text, char **end) of the C library, called from compiled code with
# addresses (a symbol, not a ctypes pointer: the compiled code stays cacheable). The text it
# reads is a number `_number` checked, followed by a delimiter or by the NUL that ends every
# Python bytes object: it never reads past the number.
_strtod = types.ExternalFunction("strtod", types.float64(types.intp, types.intp))


def _strtod_reads_json_numbers() -> bool:
    """strtod follows the C locale's LC_NUMERIC: a process that set another one would read
    "0.5" wrong."""
    return _strtod_test(np.frombuffer(b"0.5", dtype=np.uint8)) == 0.5


@njit(cache=True)
def _strtod_test(text):
    return _strtod(text.ctypes.data, 0)


_POW10 = np.array([10.0 ** k for k in range(23)])  # exact doubles: 10^k for k <= 22
_MAX_EXACT_DIGITS = 15  # a decimal significand below 10^15 < 2^53 is an exact double
_MAX_INT_DIGITS = 18  # below 10^18 < 2^63: fits int64 with no range check


class JsonSampleScanner:
    """Scans JSON samples of one schema (see the module docstring for what it accepts)."""

    def __init__(self, schema: FeatureSchema, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.n_dense = len(schema.dense)
        self.n_sparse = len(schema.sparse)
        names = [schema.label, schema.event_time, *schema.dense_names, *schema.sparse_names]
        kinds = [LABEL, TIME] + [DENSE] * self.n_dense
        kinds += [(STRING_IDS if f.multi else STRING_ID) if f.id_type == "string" else (INT_IDS if f.multi else INT_ID)
                  for f in schema.sparse]
        self._kinds = np.array(kinds, dtype=np.int64)
        self._columns = np.array([0, 0, *range(self.n_dense), *range(self.n_sparse)], dtype=np.int64)
        self._max_ids = np.array([0, 0] + [0] * self.n_dense + [f.max_ids if f.multi else 1 for f in schema.sparse],
                                 dtype=np.int64)
        self._log1p = np.array([f.transform is DenseTransform.LOG1P for f in schema.dense], dtype=np.bool_)
        encoded = [n.encode("utf-8") for n in names]
        self._name_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8) if any(encoded) else np.zeros(1, np.uint8)
        self._name_bounds = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._name_bounds[1:])
        self._slots = _field_table(encoded)

    def scan(self, messages: MessageBuffer, rows: np.ndarray) -> tuple[SampleColumns, np.ndarray]:
        """The messages at `rows` (indices into `messages`) this scanner accepts, as columns,
        and the indices of the others, for the msgspec and per-message paths to decide."""
        if not _strtod_reads_json_numbers():
            return SampleColumns.empty(self.n_dense, self.n_sparse), rows
        n, n_sparse = len(rows), self.n_sparse
        status = np.zeros(n, dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        times = np.empty(n, dtype=np.float64)
        dense = np.full((n, self.n_dense), np.nan)
        key_start = np.zeros((n, n_sparse), dtype=np.int64)
        key_count = np.zeros((n, n_sparse), dtype=np.int64)
        keys = np.empty(int(messages.lengths[rows].sum()) + 1, dtype=np.int64)  # an id takes >= 1 byte
        _scan(messages.data, messages.starts, messages.lengths, rows, self.max_message_bytes, self._slots,
              self._name_bytes, self._name_bounds, self._kinds, self._columns, self._max_ids, self._log1p, status,
              labels, times, dense, key_start, key_count, keys)
        ok = np.flatnonzero(status == 0)
        counts = key_count[ok]
        bounds = np.zeros(n_sparse + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=0), out=bounds[1:])
        flat = np.empty(int(bounds[-1]), dtype=np.int64)
        _gather(keys, key_start[ok], counts, bounds, flat)
        columns = SampleColumns(rows[ok], labels[ok], times[ok], dense[ok],
                                [flat[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())],
                                list(counts.T))
        return columns, rows[status != 0]


def _field_table(names: list[bytes]) -> np.ndarray:
    """Open addressing from a key's FNV-1a hash to its field index (-1: empty slot). A name
    that JSON cannot spell without escapes is left out: the scanner never matches it (the
    bytes of an escaped key are not its name), so messages that send it go the other way."""
    size = 8
    while size < 4 * len(names):
        size *= 2
    slots = np.full(size, -1, dtype=np.int64)
    for f, name in enumerate(names):
        if not _plain(name):
            continue
        i = _fnv1a(np.frombuffer(name, dtype=np.uint8), 0, len(name)) & (size - 1)
        while slots[i] >= 0:
            i = (i + 1) & (size - 1)
        slots[i] = f
    return slots


def _plain(name: bytes) -> bool:
    """Printable ASCII without quote or backslash: what `_string` reads as it is."""
    return all(0x20 <= c < 0x7F and c not in b'"\\' for c in name)


@njit(cache=True, inline="always")
def _fnv1a(buf, start, end):
    """FNV-1a, then a Fibonacci multiply: FNV's low bits barely differ between names such as
    C1..C26 (the probe chains were ~20 long), the product's high bits do."""
    h = np.uint64(0xCBF29CE484222325)
    for i in range(start, end):
        h = (h ^ np.uint64(buf[i])) * np.uint64(0x100000001B3)
    return np.int64((h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40))


@njit(cache=True, inline="always")
def _field(buf, start, end, slots, name_bytes, name_bounds):
    """The field whose name is buf[start:end], or -1."""
    mask = slots.size - 1
    i = _fnv1a(buf, start, end) & mask
    while True:
        f = slots[i]
        if f < 0:
            return -1
        a, b = name_bounds[f], name_bounds[f + 1]
        if b - a == end - start:
            same = True
            for k in range(b - a):
                if name_bytes[a + k] != buf[start + k]:
                    same = False
                    break
            if same:
                return f
        i = (i + 1) & mask


@njit(cache=True, inline="always")
def _is_key(buf, p, end, f, name_bytes, name_bounds):
    """Whether the key at p (its opening quote) is field f's name, quotes included."""
    a, b = name_bounds[f], name_bounds[f + 1]
    q = p + 1 + b - a
    if q >= end or buf[q] != 0x22:
        return False
    for i in range(b - a):
        if buf[p + 1 + i] != name_bytes[a + i]:
            return False
    return True


@njit(cache=True, inline="always")
def _skip_space(buf, p, end):
    while p < end:
        c = buf[p]
        if c != 0x20 and c != 0x0A and c != 0x0D and c != 0x09:
            break
        p += 1
    return p


@njit(cache=True, inline="always")
def _string(buf, p, end):
    """A string of printable ASCII without escapes at p (its opening quote): (content start,
    content end, position after the closing quote), or end -1 if it is anything else."""
    start = p + 1
    q = start
    while q < end:
        c = buf[q]
        if c == 0x22:  # "
            return start, q, q + 1
        if c < 0x20 or c >= 0x7F or c == 0x5C:  # control, non-ASCII (and DEL), backslash
            return start, -1, q
        q += 1
    return start, -1, q


@njit(cache=True, inline="always")
def _number(buf, p, end):
    """A JSON number at p (RFC 8259 grammar): (position after it or -1 if not a number,
    negative, integer literal, significand of its first 19 significant digits, significant
    digits counted, decimal exponent to apply to the significand)."""
    q = p
    negative = False
    if q < end and buf[q] == 0x2D:  # -
        negative = True
        q += 1
    if q >= end or buf[q] < 0x30 or buf[q] > 0x39:
        return -1, negative, False, np.uint64(0), 0, 0
    w = np.uint64(0)
    digits = 0
    exponent = 0
    if buf[q] == 0x30:  # a leading 0 stands alone
        q += 1
    else:
        while q < end and 0x30 <= buf[q] <= 0x39:
            if digits < 19:
                w = w * np.uint64(10) + np.uint64(buf[q] - 0x30)
            else:
                exponent += 1
            digits += 1
            q += 1
    integer = True
    if q < end and buf[q] == 0x2E:  # .
        integer = False
        q += 1
        if q >= end or buf[q] < 0x30 or buf[q] > 0x39:
            return -1, negative, False, w, digits, exponent
        while q < end and 0x30 <= buf[q] <= 0x39:
            d = buf[q] - 0x30
            if digits == 0 and d == 0:
                exponent -= 1  # a leading zero of the fraction
            elif digits < 19:
                w = w * np.uint64(10) + np.uint64(d)
                digits += 1
                exponent -= 1
            else:
                digits += 1
            q += 1
    if q < end and (buf[q] == 0x65 or buf[q] == 0x45):  # e E
        integer = False
        q += 1
        sign = 1
        if q < end and (buf[q] == 0x2B or buf[q] == 0x2D):
            sign = -1 if buf[q] == 0x2D else 1
            q += 1
        if q >= end or buf[q] < 0x30 or buf[q] > 0x39:
            return -1, negative, False, w, digits, exponent
        e = 0
        while q < end and 0x30 <= buf[q] <= 0x39:
            if e < 100000:
                e = e * 10 + (buf[q] - 0x30)
            q += 1
        exponent += sign * e
    return q, negative, integer, w, digits, exponent


@njit(cache=True, inline="always")
def _exact_double(negative, integer, w, digits, exponent):
    """The number's double if one exact operation gives it: (ok, value)."""
    if w == 0:
        return True, (-0.0 if negative and not integer else 0.0)
    if integer and digits <= _MAX_INT_DIGITS:
        v = float(np.int64(w))
    elif digits <= _MAX_EXACT_DIGITS and -22 <= exponent <= 22:
        v = float(np.int64(w))
        v = v * _POW10[exponent] if exponent >= 0 else v / _POW10[-exponent]
    else:
        return False, 0.0
    return True, -v if negative else v


@njit(cache=True, inline="always")
def _is_null(buf, p, end):
    return p + 4 <= end and buf[p] == 0x6E and buf[p + 1] == 0x75 and buf[p + 2] == 0x6C and buf[p + 3] == 0x6C


@njit(cache=True, inline="always")
def _id(buf, p, end, is_string, keys, at):
    """One id at p into keys[at]: the position after it, or -1 for anything else."""
    if is_string:
        if p >= end or buf[p] != 0x22:
            return -1
        a, b, q = _string(buf, p, end)
        if b < 0:
            return -1
        keys[at] = np.int64(_xxh64(buf, a, b))
        return q
    q, negative, integer, w, digits, _ = _number(buf, p, end)
    if q < 0 or not integer or digits > _MAX_INT_DIGITS:
        return -1
    keys[at] = -np.int64(w) if negative else np.int64(w)
    return q


@njit(cache=True)
def _scan(buf, starts, lengths, rows, max_bytes, slots, name_bytes, name_bounds, kinds, columns, max_ids, log1p,
          status, labels, times, dense, key_start, key_count, keys):
    """Scans message rows[r] into row r of the outputs (dense preset to NaN, key counts to 0:
    what a field not sent reads as); status[r] = 1 for a message left to the other paths (its
    outputs are then garbage)."""
    base = buf.ctypes.data
    seen = np.full(kinds.size, -1, dtype=np.int64)  # the last row each field was sent in
    after = np.full(kinds.size, -1, dtype=np.int64)  # the field that followed each one last time
    first = -1  # ... and the first field
    k = 0  # next free place in keys
    for r in range(rows.size):
        m = rows[r]
        p, end = starts[m], starts[m] + lengths[m]
        k0 = k
        ok = lengths[m] <= max_bytes
        if ok:
            p = _skip_space(buf, p, end)
            ok = p < end and buf[p] == 0x7B  # {
            p = _skip_space(buf, p + 1, end)
            ok = ok and p < end and buf[p] == 0x22  # the first key (an empty object has no label)
        previous = -1
        while ok:
            # a key, its colon, a value, then a comma or the closing brace. Producers send
            # their fields in one order: the key that followed this one last time is tried
            # first, a compare instead of a scan, a hash and a compare.
            f = first if previous < 0 else after[previous]
            if f >= 0 and _is_key(buf, p, end, f, name_bytes, name_bounds):
                p += 2 + name_bounds[f + 1] - name_bounds[f]
            else:
                a, b, p = _string(buf, p, end)
                f = _field(buf, a, b, slots, name_bytes, name_bounds) if b >= 0 else -1
                if f < 0:
                    ok = False
                    break
                if previous < 0:
                    first = f
                else:
                    after[previous] = f
            if seen[f] == r:
                ok = False
                break
            seen[f] = r
            previous = f
            p = _skip_space(buf, p, end)
            if p >= end or buf[p] != 0x3A:  # :
                ok = False
                break
            p = _skip_space(buf, p + 1, end)
            kind, c = kinds[f], columns[f]
            if _is_null(buf, p, end):
                p += 4
                if kind == LABEL or kind == TIME:
                    ok = False  # the definition refuses it (missing_label / missing_event_time)
                    break
                # absent: dense stays NaN, no ids
            elif kind <= DENSE:
                q, negative, integer, w, digits, exponent = _number(buf, p, end)
                if q < 0:
                    ok = False
                    break
                if kind == LABEL:
                    if not integer or digits > 1 or w > 1 or (negative and w != 0):
                        ok = False
                        break
                    labels[r] = np.int64(w)
                else:
                    exact, v = _exact_double(negative, integer, w, digits, exponent)
                    if not exact:
                        v = _strtod(base + p, 0)
                    if not np.isfinite(v) or (kind == DENSE and not log1p[c] and abs(v) > FLOAT32_MAX):
                        ok = False  # the definition refuses it (bad_event_time / non_finite_dense)
                        break
                    if kind == TIME:
                        times[r] = v
                    else:
                        dense[r, c] = v
                p = q
            else:
                is_string = kind == STRING_ID or kind == STRING_IDS
                key_start[r, c] = k
                if kind == STRING_ID or kind == INT_ID:
                    p = _id(buf, p, end, is_string, keys, k)
                    if p < 0:
                        ok = False
                        break
                    k += 1
                    key_count[r, c] = 1
                else:
                    if p >= end or buf[p] != 0x5B:  # [
                        ok = False
                        break
                    p = _skip_space(buf, p + 1, end)
                    count = 0
                    if p < end and buf[p] == 0x5D:  # ]
                        p += 1
                    else:
                        while True:
                            if count == max_ids[f]:
                                ok = False  # too_many_ids: the definition says so
                                break
                            p = _id(buf, p, end, is_string, keys, k)
                            if p < 0:
                                ok = False
                                break
                            k += 1
                            count += 1
                            p = _skip_space(buf, p, end)
                            if p < end and buf[p] == 0x2C:  # ,
                                p = _skip_space(buf, p + 1, end)
                            elif p < end and buf[p] == 0x5D:
                                p += 1
                                break
                            else:
                                ok = False
                                break
                        if not ok:
                            break
                    key_count[r, c] = count
            p = _skip_space(buf, p, end)
            if p < end and buf[p] == 0x2C:
                p = _skip_space(buf, p + 1, end)
                if p >= end or buf[p] != 0x22:
                    ok = False
                continue
            if p < end and buf[p] == 0x7D:  # }
                p = _skip_space(buf, p + 1, end)
                ok = p == end and seen[0] == r and seen[1] == r  # label and event time sent
                break
            ok = False
        if not ok:
            status[r] = 1
            k = k0


@njit(cache=True)
def _gather(keys, key_start, key_count, bounds, out):
    """Each sparse feature's ids, row after row, into out[bounds[j]:bounds[j + 1]]."""
    at = bounds[:-1].copy()
    for r in range(key_start.shape[0]):
        for j in range(key_start.shape[1]):
            s = key_start[r, j]
            for i in range(key_count[r, j]):
                out[at[j]] = keys[s + i]
                at[j] += 1
