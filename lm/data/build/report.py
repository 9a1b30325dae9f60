"""The cleaning report (`lm.data.cleaning.Report` and the per-split counts), merged from the
stages' datatrove stats.

Each task saves its steps' stats as `<stage logs>/stats/<rank>.json` (datatrove's
executors do, locally, on Slurm and on Ray); the report sums the `lm.` counts
(`lm.data.build.filters.tally`) over every task of every stage:
read, dropped per rule, passed (the rules), unique (exact dedup), kept (near dedup) and
the splits. Duplicates removed are the differences between consecutive counts.
"""

from __future__ import annotations

import collections
import glob
import json
import os
from collections.abc import Iterable

from lm.data import cleaning
from lm.data.build.filters import STAT_PREFIX


def merged_counts(stats_dirs: Iterable[str]) -> dict[str, float]:
    """`lm.` stat -> its total over all tasks' stats files under `stats_dirs`."""
    totals: dict[str, float] = collections.defaultdict(float)
    for stats_dir in stats_dirs:
        for path in sorted(glob.glob(os.path.join(stats_dir, "*.json"))):
            with open(path, encoding="utf-8") as f:
                steps = json.load(f)
            for step in steps:
                for key, value in step["stats"].items():
                    if key.startswith(STAT_PREFIX):
                        totals[key[len(STAT_PREFIX):]] += value["total"] if isinstance(value, dict) else value
    return totals


def _tally(counts: dict[str, float], name: str) -> cleaning.Tally:
    return cleaning.Tally(int(counts.get(f"{name}.documents", 0)), int(counts.get(f"{name}.chars", 0)))


def _minus(a: cleaning.Tally, b: cleaning.Tally) -> cleaning.Tally:
    return cleaning.Tally(a.documents - b.documents, a.chars - b.chars)


def build_report(counts: dict[str, float], rule_order: Iterable[str]) -> dict:
    """The report as the in-memory build stores it (`Report.to_json()` plus `splits`).

    `rule_order` lists the enabled rules in checking order; a rule that dropped nothing is
    absent, as in memory. A dedup that is off has no count of its own: it removed nothing.
    """
    read, passed = _tally(counts, "read"), _tally(counts, "passed")
    unique = _tally(counts, "unique") if "unique.documents" in counts else passed
    kept = _tally(counts, "kept") if "kept.documents" in counts else unique
    dropped = {rule: _tally(counts, f"dropped.{rule}") for rule in rule_order
               if counts.get(f"dropped.{rule}.documents")}
    report = cleaning.Report(read=read, dropped=dropped, exact_duplicates=_minus(passed, unique),
                             near_duplicates=_minus(unique, kept), kept=kept)
    splits = {split: _as_dict(_tally(counts, f"splits.{split}")) for split in ("train", "validation")}
    return {**report.to_json(), "splits": splits}


def split_bytes(counts: dict[str, float]) -> dict[str, int]:
    """Serialized record bytes per split (TFDS's `num_bytes`)."""
    return {split: int(counts.get(f"splits.{split}.bytes", 0)) for split in ("train", "validation")}


def _as_dict(tally: cleaning.Tally) -> dict:
    return {"documents": tally.documents, "chars": tally.chars}
