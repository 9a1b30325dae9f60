"""A metadata filter (`data.where`, parsed by `lm.config.inputs.parse_where`) applied to rows:
as a pyarrow expression for Parquet and Arrow inputs (Parquet row groups whose statistics
rule a filter out are never read) and as a predicate on a JSONL row's fields.

Both drop a row whose filtered column is null, as SQL and Arrow do; a filtered column a
file lacks, or whose values cannot be compared with the filter's literal, is an error.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lm.config import inputs
from lm.config.inputs import Condition
from lm.data.documents import CorpusError

_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}


def conditions(where: str | Sequence[Condition] | None) -> tuple[Condition, ...]:
    """The conditions of a filter given as text (or already parsed; None or "" for none).
    Raises CorpusError for text that is not a filter."""
    if where is None or not isinstance(where, str):
        return tuple(where or ())
    try:
        return inputs.parse_where(where)
    except ValueError as e:
        raise CorpusError(f"the filter {where!r} {e}. Fix: correct config.data.where (or the source's where).") \
            from None


def expression(conds: Sequence[Condition]) -> pc.Expression | None:
    """The conditions as one pyarrow expression (None for none)."""
    if not conds:
        return None
    return functools.reduce(operator.and_, (_COMPARE[c.op](pc.field(c.column), c.value) for c in conds))


def _kind(value: Any) -> str:
    return "boolean" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"


def arrow_kind(column_type: pa.DataType) -> str:
    """"string", "number", "boolean" or the type's own name: what a literal must be to compare."""
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or \
            pa.types.is_string_view(column_type):
        return "string"
    if pa.types.is_integer(column_type) or pa.types.is_floating(column_type) or pa.types.is_decimal(column_type):
        return "number"
    return "boolean" if pa.types.is_boolean(column_type) else str(column_type)


def schema_problem(schema: pa.Schema, conds: Sequence[Condition]) -> str | None:
    """What keeps the filter from applying to a file of this schema, or None."""
    for c in conds:
        if c.column not in schema.names:
            return f"has no column {c.column!r}, which the filter names (its columns: {', '.join(schema.names)})"
        kind = arrow_kind(schema.field(c.column).type)
        if kind != _kind(c.value):
            return (f"has column {c.column!r} of type {schema.field(c.column).type}, which the filter compares "
                    f"with the {_kind(c.value)} {c.value!r}")
    return None


def keep(row: dict, conds: Sequence[Condition], where: str) -> bool:
    """Whether a JSONL row (at `where`, "path:line") passes every condition. Raises
    CorpusError for a row without a filtered field, or with a value of another kind."""
    for c in conds:
        if c.column not in row:
            raise CorpusError(f"{where} has no field {c.column!r}, which the filter names (its fields: "
                              f"{', '.join(row)}). Fix: filter on a field every row has, or add it.")
        value = row[c.column]
        if value is None:
            return False
        kind = _kind(value) if isinstance(value, (str, int, float, bool)) else type(value).__name__
        if kind != _kind(c.value):
            raise CorpusError(f"{where} has {c.column}={value!r} ({kind}), which the filter compares with the "
                              f"{_kind(c.value)} {c.value!r}. Fix: compare it with a {kind} literal.")
        if not _COMPARE[c.op](value, c.value):
            return False
    return True
