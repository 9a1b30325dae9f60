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
    `drop_highest` highest-loss runs dropped."""
    if not rows:
        raise ResultsError(f"{path} has no rows. Fix: wait for the sweep's first points to finish.")
    present = set(rows[0])
    required = [columns.n, columns.loss] + ([] if columns.d in present or columns.c in present else [columns.d])
    missing = [c for c in required if c not in present]
    if missing:
        raise ResultsError(f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(sorted(present))}). "
                          "Fix: name them with --n_column, --d_column, --c_column, --loss_column.")
    rows = [r for r in rows if r.get(columns.loss) not in (None, "")]
    number = lambda r, c: float(r[c]) if c in r and r[c] not in (None, "") else np.nan
    n, loss = (np.array([number(r, c) for r in rows]) for c in (columns.n, columns.loss))
    d = np.array([number(r, columns.d) for r in rows])
    c = np.array([number(r, columns.c) for r in rows])
    d = np.where(np.isnan(d), c / (6 * n), d)
    c = np.where(np.isnan(c), 6 * n * d, c)
    budget = np.nan_to_num(np.array([number(r, columns.budget) for r in rows]))
    runs = laws.Runs(n, d, c, loss, budget)
    if drop_highest:
        runs = runs.take(np.argsort(loss)[:-drop_highest])
    return runs
