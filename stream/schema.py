"""The feature schema: features are data, not code.

A YAML file names the label, the event-time field, the dense features (with an optional
transform) and the sparse features (single- or multi-valued, string or integer ids), the
embedding table each sparse feature reads, and each table's dimension. Criteo, a
MovieLens-like schema or a user's own all work without code changes.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DenseTransform(str, Enum):
    NONE = "none"
    LOG1P = "log1p"  # Criteo's counts: sign(x) * log1p(|x|) tames heavy tails


class DenseFeature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    transform: DenseTransform = DenseTransform.NONE
    # Value used when the field is absent or null (Criteo leaves many dense fields empty).
    default: float = 0.0


class SparseFeature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    # Table this feature reads; several features may share one (e.g. item id and history).
    table: str | None = None
    id_type: Literal["string", "int"] = "string"
    multi: bool = False
    pooling: Literal["sum", "mean"] = "sum"
    # Multi-valued features longer than this are refused: one message must not blow up a batch.
    max_ids: int = Field(default=256, ge=1)

    @property
    def table_name(self) -> str:
        return self.table or self.name


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dim: int = Field(ge=1, le=1024)


class FeatureSchema(BaseModel):
    """Parsed and cross-checked feature schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "default"
    label: str = "label"
    event_time: str = "ts"
    dense: tuple[DenseFeature, ...] = ()
    sparse: tuple[SparseFeature, ...] = ()
    tables: tuple[TableSpec, ...] = ()
    # A sample field the schema does not name: "reject" dead-letters the message (reason
    # unknown_field: a producer sending what nobody reads is a bug to surface), "ignore" drops it.
    unknown_fields: Literal["reject", "ignore"] = "reject"

    @model_validator(mode="after")
    def _check(self) -> "FeatureSchema":
        names = [self.label, self.event_time, *(f.name for f in self.dense), *(f.name for f in self.sparse)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"field names used twice in the schema: {dupes}")
        escaped = [n for n in names if any(c in '"\\' or ord(c) < 0x20 for c in n)]
        if escaped:  # JSON writes them only with escapes; the sample codecs match names as written
            raise ValueError(f"field names with a quote, a backslash or a control character: {escaped}")
        if not self.sparse:
            raise ValueError("the schema needs at least one sparse feature")
        table_names = {t.name for t in self.tables}
        missing = sorted({f.table_name for f in self.sparse} - table_names)
        if missing:
            raise ValueError(f"sparse features read tables that are not declared: {missing}")
        unused = sorted(table_names - {f.table_name for f in self.sparse})
        if unused:
            raise ValueError(f"tables declared but read by no feature: {unused}")
        return self

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FeatureSchema":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> "FeatureSchema":
        """Accepts the compact YAML form: `tables` as a mapping name -> dim or {dim: ...},
        and `default_dim` for sparse features whose table is not declared."""
        raw = dict(raw)
        default_dim = raw.pop("default_dim", None)
        tables = raw.get("tables", {})
        if isinstance(tables, dict):
            tables = [
                {"name": name, **(spec if isinstance(spec, dict) else {"dim": spec})}
                for name, spec in tables.items()
            ]
        tables = list(tables)
        if default_dim is not None:
            declared = {t["name"] for t in tables}
            for f in raw.get("sparse", []):
                table = f.get("table") or f["name"]
                if table not in declared:
                    tables.append({"name": table, "dim": default_dim})
                    declared.add(table)
        raw["tables"] = tables
        return cls.model_validate(raw)


BUILTIN_SCHEMAS = Path(__file__).resolve().parent.parent / "freshrec" / "configs"


def load_schema(name_or_path: str | Path) -> FeatureSchema:
    """A path to a YAML file, or the name of a schema shipped with freshrec ("criteo")."""
    path = Path(name_or_path)
    if not path.exists():
        path = BUILTIN_SCHEMAS / f"{name_or_path}.schema.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no schema file {name_or_path!r} (nor a built-in schema of that name)")
    return FeatureSchema.from_yaml(path)
