"""lm's quality rules as a datatrove filter, and the counts the cleaning report is made of.

The rules are `lm.data.cleaning.quality_rules`, the same functions the in-memory build
runs, checked in the same order, so a document is dropped by the same (first) rule in
both builds. Counts are datatrove stats: each stat below is updated once per document
with its length, so its merged `total` is characters and its `n` documents; the report
(`lm.data.build.report`) reads them from the stages' stats files.
"""

from __future__ import annotations

import ml_collections
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from lm.data import cleaning

STAT_PREFIX = "lm."  # stats the report reads; datatrove's own stats are left alone


def tally(step: PipelineStep, name: str, text: str) -> None:
    """Counts one document of `len(text)` characters under report stat `name`."""
    step.stat_update(f"{STAT_PREFIX}{name}.documents")
    step.stat_update(f"{STAT_PREFIX}{name}.chars", value=len(text))


class QualityRules(BaseFilter):
    """Drops a document that breaks one of `config.data.filters`' rules (`cleaning.quality_rules`)."""

    name = "lm quality rules"

    def __init__(self, rules: dict):
        super().__init__()
        self.rules = dict(rules)  # a plain dict: steps are pickled to workers, Slurm jobs and Ray actors
        self._checks = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._checks is None:
            self._checks = cleaning.quality_rules(ml_collections.ConfigDict(self.rules))
        failed = next((name for name, fails in self._checks if fails(doc.text)), None)
        if failed is None:
            return True
        tally(self, f"dropped.{failed}", doc.text)
        return False, failed

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_checks": None}  # closures are rebuilt where the step runs


class Count(PipelineStep):
    """Passes documents through, counting them (and their characters) as report stat `name`."""

    name = "lm count"
    type = "📊 - STATS"

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            tally(self, self.label, doc.text)
            yield doc
