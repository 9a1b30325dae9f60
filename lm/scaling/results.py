"""Reading a results table (CSV or JSONL) into `laws.Runs`, with clear errors."""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np

from lm.data import documents
from lm.errors import UsageError
from lm.scaling import laws


class ResultsError(UsageError):
    """A results table that is missing, empty, unreadable or lacks a named column."""


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which columns hold N, D, C, the loss and the IsoFLOP budget. D or C may be absent
    (derived with C = 6 N D); the budget is optional."""

    n: str = "parameters"
    d: str = "tokens"
    c: str = "flops"
    loss: str = "val_loss"
    budget: str = "budget"


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise ResultsError(f"the results table {path} does not exist. Fix: run lm.sweep first, or check the path.")
    # Read as corpora are: a spreadsheet's CSV often starts with a byte-order mark (which
    # would otherwise prefix the first column's name) and ends its lines with CRLF.
    try:
        if path.endswith(".jsonl"):
            return [row for _, row in documents.read_jsonl(path)]
        return list(csv.DictReader(io.StringIO(documents.read_text(path))))
    except documents.CorpusError as e:
        raise ResultsError(str(e)) from None


def to_runs(rows: list[dict], path: str, columns: Columns = Columns(), drop_highest: int = 0) -> laws.Runs:
    """The runs of a table, with rows lacking a loss (unfinished) left out and the
    `drop_highest` highest-loss runs dropped. Raises ResultsError naming the row and
    column of a cell that is not a number, or an N, D, C or loss that is not positive
    (the laws take their logarithms)."""
    if not rows:
        raise ResultsError(f"{path} has no rows. Fix: wait for the sweep's first points to finish.")
    present = set(rows[0])
    required = [columns.n, columns.loss] + ([] if columns.d in present or columns.c in present else [columns.d])
    missing = [c for c in required if c not in present]
    if missing:
        raise ResultsError(f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(sorted(present))}). "
                          "Fix: name them with --n_column, --d_column, --c_column, --loss_column.")
    finished = [(i, r) for i, r in enumerate(rows) if r.get(columns.loss) not in (None, "")]
    names = (columns.n, columns.d, columns.c, columns.loss, columns.budget)
    n, d, c, loss, budget = np.array([[_number(r, name, i, path) for name in names] for i, r in finished]
                                     ).reshape(-1, len(names)).T
    d = np.where(np.isnan(d), c / (6 * n), d)
    c = np.where(np.isnan(c), 6 * n * d, c)
    for (i, _), values in zip(finished, zip(n, d, c, loss, strict=True), strict=True):
        if not all(np.isfinite(v) and v > 0 for v in values):
            raise ResultsError(f"{path} row {i + 1}: N, D, C and the loss must be positive numbers; they are "
                               f"{', '.join(f'{v:g}' for v in values)} ({columns.n}, {columns.d} or C / 6N, "
                               f"{columns.c} or 6ND, {columns.loss}). Fix: correct or remove the row.")
    runs = laws.Runs(n, d, c, loss, np.nan_to_num(budget))
    if drop_highest >= len(runs) > 0:
        raise ResultsError(f"--drop_highest={drop_highest} drops all {len(runs)} finished runs of {path}. "
                           "Fix: drop fewer.")
    if drop_highest:
        runs = runs.take(np.argsort(loss)[:-drop_highest])
    return runs


def _number(row: dict, column: str, i: int, path: str) -> float:
    """The cell as a float; NaN when the column is absent or the cell empty."""
    value = row.get(column)
    if value in (None, ""):
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ResultsError(f"{path} row {i + 1}, column {column!r}: {str(value)[:40]!r} is not a number. Fix: "
                           "correct the cell, or name the right column with --n_column, --d_column, --c_column, "
                           "--loss_column or --budget_column.") from None
