"""Request and response models of the serving API, derived from the feature schema.

One `Example` type per schema: every dense feature is an optional finite number, every
sparse feature an optional id (string or int64, per the schema) or a list of ids for a
multi-valued one (at most `max_ids`); any other field is refused. The schema's label and
event-time fields are accepted and ignored, so a sample can be sent as it is.

`RequestParser` validates the raw body in one pass and turns it into the model's `Inputs`
directly: in the ranking form the shared context is parsed and hashed once, a sparse
feature no candidate sets stays one shared bag, so its embedding is looked up and pooled
once for the whole request, and the dense features stay one shared row unless a candidate
sets one (the model then computes what depends only on shared inputs once). The pydantic
models define what is accepted (and document it in OpenAPI); msgspec structs derived from
the same schema validate the common case 2-3x faster (a 100-candidate ranking body: 127-157
-> 55-63 µs), and any body they refuse is decided by the pydantic models, so a request is
accepted, or refused with the same 422, exactly as the pydantic models alone would do
(tests/test_serving_parse.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import msgspec
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, create_model, model_validator
from typing_extensions import TypedDict

from serving.model import Inputs, SparseInput
from stream.hashing import INT64_MAX, INT64_MIN, hash_string_id, hash_string_ids
from stream.sample import FLOAT32_MAX, dense_value_type
from stream.schema import DenseTransform, FeatureSchema

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# A dense value the model reads as it is must be finite in float32 too (log1p brings every
# float64 into range): as inf it would turn the scores into NaN.
Float32Number = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
IntId = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
_ABSENT = object()  # a row that does not send a feature (it reads the context's)


class TooLarge(Exception):
    """More examples or candidates than the node accepts (HTTP 413)."""


class InvalidRequest(Exception):
    """A request that does not fit the schema (HTTP 422): FastAPI-style error details."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


class _OneForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _one_form(self):
        if (self.examples is None) == (self.candidates is None):
            raise ValueError("give either `examples`, or `candidates` (with optional `context`)")
        if self.examples is not None and self.context is not None:
            raise ValueError("`context` goes with `candidates`, not with `examples`")
        return self


def example_type(schema: FeatureSchema) -> type:
    """The schema's example as a TypedDict (only the fields a client sent are present)."""
    fields: dict[str, Any] = {f.name: Optional[Number if f.transform is DenseTransform.LOG1P else Float32Number]
                              for f in schema.dense}
    for f in schema.sparse:
        one = StrictStr if f.id_type == "string" else IntId
        fields[f.name] = Optional[Annotated[list[one], Field(max_length=f.max_ids)]] if f.multi else Optional[one]
    fields[schema.label] = Optional[Any]
    fields[schema.event_time] = Optional[Any]
    example = TypedDict(f"{_camel(schema.name)}Example", fields, total=False)
    example.__pydantic_config__ = ConfigDict(extra="forbid")
    return example


def request_model(schema: FeatureSchema) -> type[BaseModel]:
    example = example_type(schema)
    return create_model(
        "PredictRequest",
        __base__=_OneForm,
        __doc__="Either `examples` (each a full set of features), or ranking: `context` features shared by "
                "every one of `candidates` (a candidate's own fields win over the context's).",
        examples=(Optional[list[example]], None),
        context=(Optional[example], None),
        candidates=(Optional[list[example]], None),
    )


def _fast_request_type(schema: FeatureSchema) -> type[msgspec.Struct]:
    """The request as msgspec structs, never looser than `request_model`: the same types
    and ranges, unknown fields refused, and every field of an example UNSET unless sent
    (`msgspec.to_builtins` then gives the dict of the fields sent, as pydantic does).
    Attributes are named f0, f1, ...: schema names need not be Python identifiers."""
    int_id = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
    types: list[object] = [dense_value_type(f) for f in schema.dense]
    for f in schema.sparse:
        one = str if f.id_type == "string" else int_id
        types.append(Annotated[list[one], msgspec.Meta(max_length=f.max_ids)] if f.multi else one)
    names = [*schema.dense_names, *schema.sparse_names]
    fields = [(f"f{i}", Optional[t], msgspec.UNSET) for i, t in enumerate(types)]
    fields += [(f"f{len(names)}", Any, msgspec.UNSET), (f"f{len(names) + 1}", Any, msgspec.UNSET)]
    names += [schema.label, schema.event_time]
    example = msgspec.defstruct("FastExample", fields, rename={f"f{i}": n for i, n in enumerate(names)},
                                forbid_unknown_fields=True, omit_defaults=True)
    return msgspec.defstruct("FastRequest", [("examples", Optional[list[example]], None),
                                             ("context", Optional[example], None),
                                             ("candidates", Optional[list[example]], None)],
                             forbid_unknown_fields=True)


class RequestParser:
    def __init__(self, schema: FeatureSchema, max_examples: int) -> None:
        self.schema = schema
        self.max_examples = max_examples
        self.model = request_model(schema)
        self._fast = msgspec.json.Decoder(_fast_request_type(schema))
        self._defaults = np.array([f.default for f in schema.dense], dtype=np.float64)
        self._log1p = np.array([f.transform is DenseTransform.LOG1P for f in schema.dense], dtype=bool)
        self._fields: dict[str, tuple[bool, int]] = {f.name: (True, i) for i, f in enumerate(schema.dense)}
        self._fields.update({f.name: (False, i) for i, f in enumerate(schema.sparse)})
        self._string = [f.id_type == "string" for f in schema.sparse]
        self._multi = [f.multi for f in schema.sparse]

    def parse(self, body: bytes) -> Inputs:
        parsed = self._parse_fast(body)
        context, rows = parsed if parsed is not None else self._parse_pydantic(body)
        if len(rows) > self.max_examples:
            raise TooLarge(f"{len(rows)} examples or candidates exceed the limit of {self.max_examples}")
        return self.inputs(context, rows)

    def _parse_fast(self, body: bytes) -> tuple[dict, list[dict]] | None:
        """(context, rows) as the pydantic models would give them, or None where msgspec
        refuses the body or it breaks the one-form rule: the pydantic models decide those."""
        try:
            request = self._fast.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        examples, context, candidates = request.examples, request.context, request.candidates
        if (examples is None) == (candidates is None) or (examples is not None and context is not None):
            return None
        rows = msgspec.to_builtins(examples if examples is not None else candidates)
        return (msgspec.to_builtins(context) if context is not None else {}), rows

    def _parse_pydantic(self, body: bytes) -> tuple[dict, list[dict]]:
        try:
            request = self.model.model_validate_json(body)
        except ValidationError as e:
            raise InvalidRequest(
                [{"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
                 for e_ in e.errors(include_url=False, include_input=False, include_context=False)]) from None
        rows = request.examples if request.examples is not None else request.candidates
        return request.context or {}, rows

    def inputs(self, context: dict, rows: list[dict]) -> Inputs:
        """Model inputs for rows that each override the shared `context`."""
        n = len(rows)
        n_sparse = len(self.schema.sparse)
        ctx_dense = self._defaults.copy()
        ctx_keys: list[tuple[int, ...]] = [()] * n_sparse
        for name, value in context.items():
            self._set(name, value, ctx_dense, ctx_keys)

        dense = ctx_dense[None]  # one row for all, until a row sends a dense feature of its own
        per_row: dict[int, list] = {}  # sparse feature -> each row's value as sent, or _ABSENT
        fields = self._fields
        for i, row in enumerate(rows):
            for name, value in row.items():
                spec = fields.get(name)
                if spec is None:
                    continue  # label / event time
                is_dense, j = spec
                if is_dense:
                    if len(dense) < n:
                        dense = np.tile(ctx_dense, (n, 1))
                    dense[i, j] = self._defaults[j] if value is None else value
                else:
                    values = per_row.get(j)
                    if values is None:
                        values = per_row[j] = [_ABSENT] * n
                    values[i] = value

        if self._log1p.any():
            cols = dense[:, self._log1p]
            dense[:, self._log1p] = np.copysign(np.log1p(np.abs(cols)), cols)
        sparse = []
        for j in range(n_sparse):
            values = per_row.get(j)
            if values is None:
                sparse.append(SparseInput(np.array(ctx_keys[j], dtype=np.int64)))
                continue
            if not self._multi[j] and _ABSENT not in values and None not in values:
                # Every row sends its one id (a ranking's candidate features): hashed in one call.
                keys = hash_string_ids(values) if self._string[j] else np.array(values, dtype=np.int64)
                sparse.append(SparseInput(keys, np.arange(n, dtype=np.int64), True))
                continue
            keys = [ctx_keys[j] if v is _ABSENT else self._keys(j, v) for v in values]
            lengths = np.fromiter(map(len, keys), dtype=np.int64, count=n)
            flat = np.fromiter((k for ks in keys for k in ks), dtype=np.int64, count=int(lengths.sum()))
            offsets = np.zeros(n, dtype=np.int64)
            np.cumsum(lengths[:-1], out=offsets[1:])
            sparse.append(SparseInput(flat, offsets, bool((lengths == 1).all())))
        return Inputs(n, torch.from_numpy(dense.astype(np.float32)), tuple(sparse))

    def _set(self, name: str, value: Any, dense: np.ndarray, keys: list) -> None:
        spec = self._fields.get(name)
        if spec is None:
            return
        is_dense, j = spec
        if is_dense:
            dense[j] = self._defaults[j] if value is None else value
        else:
            keys[j] = self._keys(j, value)

    def _keys(self, j: int, value: Any) -> tuple[int, ...]:
        if value is None:
            return ()
        if self._multi[j]:
            return tuple(hash_string_id(v) for v in value) if self._string[j] else tuple(value)
        return (hash_string_id(value),) if self._string[j] else (value,)


class PredictResponse(BaseModel):
    scores: list[float] = Field(description="click probability per example or candidate, in request order")
    version: int = Field(description="the model version every score came from")
    global_step: int
    watermark: float = Field(description="newest event time (unix s) the version has learned")
    model_age_s: float = Field(description="seconds since the version was cut by the trainer")


class ModelInfo(BaseModel):
    version: int | None
    head: int | None
    lag_versions: int | None
    global_step: int | None
    watermark: float | None
    model_age_s: float | None
    pinned: int | None
    live_rows: dict[str, int]
    last_error: str | None


class VersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, description="a version retained in Redis")


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.replace("-", "_").split("_") if p) or "Schema"


__all__ = ["RequestParser", "InvalidRequest", "TooLarge", "PredictResponse", "ModelInfo", "VersionRequest",
           "request_model", "example_type"]
