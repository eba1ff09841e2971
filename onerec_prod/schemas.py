"""Table schemas from ``schemas/*.yaml``: the single source of columns, types and checks.

Each YAML file describes one table (name, format, partitioning, key, columns, checks).
This module turns them into Spark ``StructType`` objects and into pure-Python row
validators; jobs use nothing else to know a table's shape.

    >>> s = load_schema("events")
    >>> s.column_names[:3]
    ['event_id', 'user_id', 'item_id']
    >>> validate_fields(load_schema("raw_events"), {"event_id": "e1", "user_id": "u"})
    'missing_field:item_id'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_SIMPLE_TYPES = {"string", "int", "bigint", "double", "float", "boolean", "date", "timestamp"}
_CHECK_RULES = {"non_empty", "min", "max", "unique", "not_after_day_end", "known_item"}


class SchemaError(ValueError):
    """A schema file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    description: str = ""


@dataclass(frozen=True)
class Check:
    column: str
    rule: str
    value: Any = None
    reason: str | None = None


@dataclass(frozen=True)
class TableSchema:
    name: str
    description: str
    format: str
    partition_by: tuple[str, ...]
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name!r} has no column {name!r}")

    def spark_schema(self):  # -> pyspark.sql.types.StructType (imported lazily)
        from pyspark.sql import types as T

        return T.StructType(
            [T.StructField(c.name, spark_type(c.type), c.nullable) for c in self.columns]
        )

    def ddl(self) -> str:
        """Spark DDL string, e.g. ``event_id STRING NOT NULL, ...``."""
        return ", ".join(
            f"`{c.name}` {c.type.upper()}{'' if c.nullable else ' NOT NULL'}" for c in self.columns
        )


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur).strip())
    return parts


def check_type(type_str: str) -> None:
    """Raise SchemaError if ``type_str`` is not a supported type."""
    t = type_str.strip().lower()
    if t in _SIMPLE_TYPES:
        return
    if t.startswith("array<") and t.endswith(">"):
        return check_type(t[6:-1])
    if t.startswith("struct<") and t.endswith(">"):
        for part in _split_top(t[7:-1]):
            if ":" not in part:
                raise SchemaError(f"struct field {part!r} needs name:type")
            check_type(part.split(":", 1)[1])
        return
    raise SchemaError(f"unsupported type {type_str!r} (supported: {sorted(_SIMPLE_TYPES)}, "
                      "array<...>, struct<name:type,...>)")


def spark_type(type_str: str):
    """Spark DataType for a schema type string (``array<int>``, ``struct<a:string>``...)."""
    from pyspark.sql import types as T

    t = type_str.strip().lower()
    simple = {
        "string": T.StringType(), "int": T.IntegerType(), "bigint": T.LongType(),
        "double": T.DoubleType(), "float": T.FloatType(), "boolean": T.BooleanType(),
        "date": T.DateType(), "timestamp": T.TimestampType(),
    }
    if t in simple:
        return simple[t]
    if t.startswith("array<"):
        return T.ArrayType(spark_type(t[6:-1]), True)
    if t.startswith("struct<"):
        fields = []
        for part in _split_top(t[7:-1]):
            name, sub = part.split(":", 1)
            fields.append(T.StructField(name.strip(), spark_type(sub), True))
        return T.StructType(fields)
    raise SchemaError(f"unsupported type {type_str!r}")


def _parse(path: Path) -> TableSchema:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SchemaError(f"{path.name}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SchemaError(f"{path.name}: must be a mapping")
    missing = [k for k in ("name", "format", "columns") if k not in raw]
    if missing:
        raise SchemaError(f"{path.name}: missing top-level keys {missing}")
    unknown = set(raw) - {"name", "description", "format", "partition_by", "key", "columns", "checks"}
    if unknown:
        raise SchemaError(f"{path.name}: unknown top-level keys {sorted(unknown)}")
    cols = []
    for i, c in enumerate(raw["columns"]):
        for k in ("name", "type", "nullable"):
            if k not in c:
                raise SchemaError(f"{path.name}: columns[{i}] is missing {k!r}")
        try:
            check_type(c["type"])
        except SchemaError as e:
            raise SchemaError(f"{path.name}: column {c['name']!r}: {e}") from None
        cols.append(Column(c["name"], c["type"], bool(c["nullable"]), c.get("description", "")))
    names = [c.name for c in cols]
    if len(set(names)) != len(names):
        raise SchemaError(f"{path.name}: duplicate column names")
    checks = []
    for i, ch in enumerate(raw.get("checks") or []):
        if ch.get("rule") not in _CHECK_RULES:
            raise SchemaError(
                f"{path.name}: checks[{i}].rule {ch.get('rule')!r} unknown (valid: {sorted(_CHECK_RULES)})"
            )
        if ch.get("column") not in names:
            raise SchemaError(f"{path.name}: checks[{i}].column {ch.get('column')!r} is not a column")
        checks.append(Check(ch["column"], ch["rule"], ch.get("value"), ch.get("reason")))
    for k in list(raw.get("partition_by") or []) + list(raw.get("key") or []):
        if k not in names:
            raise SchemaError(f"{path.name}: partition/key column {k!r} is not a column")
    if raw["name"] != path.stem:
        raise SchemaError(f"{path.name}: name {raw['name']!r} must match the file name")
    return TableSchema(
        name=raw["name"], description=raw.get("description", ""), format=raw["format"],
        partition_by=tuple(raw.get("partition_by") or ()), key=tuple(raw.get("key") or ()),
        columns=tuple(cols), checks=tuple(checks),
    )


@functools.cache
def load_schema(name: str, schema_dir: Path = SCHEMA_DIR) -> TableSchema:
    """Load ``schemas/<name>.yaml``; raises SchemaError naming the problem."""
    path = Path(schema_dir) / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(schema_dir).glob("*.yaml"))
        raise SchemaError(f"no schema named {name!r} (known: {', '.join(known)})")
    return _parse(path)


def all_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, TableSchema]:
    return {p.stem: load_schema(p.stem, schema_dir) for p in sorted(Path(schema_dir).glob("*.yaml"))}


_PY_TYPES = {
    "string": (str,), "int": (int,), "bigint": (int,), "double": (int, float),
    "float": (int, float), "boolean": (bool,),
}


def validate_fields(schema: TableSchema, row: dict[str, Any]) -> str | None:
    """Check presence, nullability, JSON type and row-local checks of one parsed row.

    Returns None when the row is valid, else the first failure reason
    (``missing_field:<col>``, ``bad_type:<col>``, ``empty:<col>`` or a check's reason).
    Checks that need context (``not_after_day_end``, ``known_item``, ``unique``) are
    left to the job, which has the day and the catalog.
    """
    if not isinstance(row, dict):
        return "malformed_json"
    for col in schema.columns:
        val = row.get(col.name)
        if val is None:
            if not col.nullable:
                return f"missing_field:{col.name}"
            continue
        py = _PY_TYPES.get(col.type)
        if py is not None:
            if isinstance(val, bool) and col.type != "boolean":
                return f"bad_type:{col.name}"
            if not isinstance(val, py):
                return f"bad_type:{col.name}"
    for ch in schema.checks:
        val = row.get(ch.column)
        if val is None:
            continue
        if ch.rule == "non_empty" and isinstance(val, str) and not val.strip():
            return ch.reason or f"empty:{ch.column}"
        if ch.rule == "min" and val < ch.value:
            return ch.reason or f"below_min:{ch.column}"
        if ch.rule == "max" and val > ch.value:
            return ch.reason or f"above_max:{ch.column}"
    return None


def check_reason(schema: TableSchema, rule: str) -> str:
    """The quarantine reason a schema gives a context check (e.g. ``known_item``)."""
    for ch in schema.checks:
        if ch.rule == rule:
            return ch.reason or rule
    raise KeyError(f"schema {schema.name!r} has no {rule!r} check")


# --------------------------------------------------------------------------------------
# Spark side: the same validation as :func:`validate_fields`, as built-in column expressions
# over a parsed JSON line (a VARIANT from ``try_parse_json``), so jobs need no Python UDF.

_VARIANT_TYPES = {
    "string": ("STRING",),
    "int": ("TINYINT", "SMALLINT", "INT", "BIGINT"),
    "bigint": ("TINYINT", "SMALLINT", "INT", "BIGINT"),
    "double": ("TINYINT", "SMALLINT", "INT", "BIGINT", "FLOAT", "DOUBLE", "DECIMAL"),
    "float": ("TINYINT", "SMALLINT", "INT", "BIGINT", "FLOAT", "DOUBLE", "DECIMAL"),
    "boolean": ("BOOLEAN",),
    "date": ("STRING", "DATE"),
    "timestamp": ("STRING", "TIMESTAMP", "TIMESTAMP_NTZ"),
}


def _json_path(name: str) -> str:
    return f"$['{name}']"


def _variant_type_ok(type_str: str, variant_type):
    """Column: the JSON value's variant type (``schema_of_variant``) fits schema type ``type_str``."""
    from pyspark.sql import functions as F

    t = type_str.strip().lower()
    if t.startswith("array<"):
        return variant_type.startswith("ARRAY")
    if t.startswith("struct<"):
        return variant_type.startswith("OBJECT")
    allowed = _VARIANT_TYPES[t]
    # DECIMAL is reported with its precision, e.g. DECIMAL(20,0) for an integer beyond bigint
    base = F.regexp_extract(variant_type, r"^([A-Z_]+)", 1)
    return base.isin(*allowed)


def spark_json_fields(schema: TableSchema, v):
    """Typed columns of schema ``schema`` extracted from a VARIANT column ``v`` (null if absent/bad)."""
    from pyspark.sql import functions as F

    return [F.try_variant_get(v, _json_path(c.name), c.type).alias(c.name) for c in schema.columns]


def spark_row_reason(schema: TableSchema, v, raw=None):
    """Column: the first failure reason of a parsed JSON line, or null when it is valid.

    ``v`` is ``try_parse_json(raw_line)`` (null = not JSON); ``raw``, the line itself, if given,
    makes the is-it-an-object test a cheap look at its first character. Same order and reasons as
    :func:`validate_fields`: ``malformed_json`` (not JSON, or not an object), then per column in
    schema order ``missing_field:<col>`` / ``bad_type:<col>``, then the row-local checks
    (``non_empty``, ``min``, ``max``) with their reasons. JSON ``null`` counts as missing.
    Integers beyond bigint and numbers with a fraction are ``bad_type`` of an int column.
    """
    from pyspark.sql import functions as F

    is_object = raw.rlike(r"^\s*\{") if raw is not None else F.schema_of_variant(v).startswith("OBJECT")
    cases = [(v.isNull() | ~is_object, "malformed_json")]
    for c in schema.columns:
        field_v = F.variant_get(v, _json_path(c.name), "variant")
        is_null = field_v.isNull() | F.is_variant_null(field_v)
        if not c.nullable:
            cases.append((is_null, f"missing_field:{c.name}"))
        if c.type.strip().lower() in _VARIANT_TYPES or c.type.lower().startswith(("array<", "struct<")):
            cases.append((~is_null & ~_variant_type_ok(c.type, F.schema_of_variant(field_v)),
                          f"bad_type:{c.name}"))
    for ch in schema.checks:
        col_type = schema.column(ch.column).type
        val = F.try_variant_get(v, _json_path(ch.column), col_type)
        if ch.rule == "non_empty" and col_type == "string":
            cases.append((val.isNotNull() & val.rlike(r"^\s*$"), ch.reason or f"empty:{ch.column}"))
        elif ch.rule == "min":
            cases.append((val.isNotNull() & (val < F.lit(ch.value)), ch.reason or f"below_min:{ch.column}"))
        elif ch.rule == "max":
            cases.append((val.isNotNull() & (val > F.lit(ch.value)), ch.reason or f"above_max:{ch.column}"))
    expr = None
    for cond, reason in cases:
        expr = F.when(cond, F.lit(reason)) if expr is None else expr.when(cond, F.lit(reason))
    return expr
