"""The build's datatrove stages, in order, for one corpus.

    filter        T tasks  read -> count -> quality rules -> count -> (jsonl, exact signatures)
    exact_find    1 task   duplicate hashes across all tasks' signatures
    exact_filter  T tasks  jsonl -> drop exact copies -> count -> (jsonl, MinHash signatures, shingle hashes)
    near_buckets  b tasks  candidate pairs: documents sharing a band, per band
    near_cluster  1 task   candidates -> exact Jaccard >= threshold -> clusters -> the documents to remove
    write         T tasks  jsonl -> drop near copies -> count -> hash split -> ArrayRecord shards

A stage whose dedup is off is left out, and the stage before it writes the shards. Each
`T`-task stage's task `r` reads what task `r` of the stage before wrote, so the document
indices datatrove's dedup stages record stay valid. Memory: a task holds one document at
a time plus its own signature array and shingle offsets (tens of bytes per document of its
share); the finders stream sorted signature files; the cluster stage holds one band's
candidates and the verified pairs' clusters, and memory-maps the shingle hashes
(`lm.data.build.near`).
"""

from __future__ import annotations

import dataclasses
import os

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashDedupBuckets,
    MinhashDedupFilter,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from lm.data.build import dedup
from lm.data.build.filters import Count, QualityRules
from lm.data.build.near import VerifiedCluster
from lm.data.build.read import ReadFiles
from lm.data.build.shards import WriteShards


@dataclasses.dataclass
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a build keeps its intermediate files (all under `work`, removed on success)."""

    work: str

    def __getattr__(self, name: str) -> str:  # layout.ruled -> <work>/ruled, etc.
        if name.startswith("_"):
            raise AttributeError(name)
        return os.path.join(self.work, name)

    def logs(self, stage: str) -> str:
        return os.path.join(self.work, "logs", stage)


class ReadTask(PipelineStep):
    """Reads back what the same task of an earlier stage wrote with `_jsonl(folder)`."""

    name = "lm task's documents"
    type = "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        reader = JsonlReader(self.folder, compression=None)
        name = f"{rank:05d}.jsonl"
        if os.path.exists(os.path.join(self.folder, name)):  # a task that kept nothing wrote nothing
            yield from reader.read_file(name)


def _jsonl(folder: str) -> JsonlWriter:
    # Uncompressed: it is read once, by the next stage, and then deleted.
    return JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None)


def stages(files: tuple[str, ...], options: dict, layout: Layout, tasks: int) -> list[Stage]:
    """The stages that build `files` with `options` (`text_files.corpus_options`) in `tasks` tasks."""
    dd = options["dedup"]
    exact, near = bool(dd["exact"]), bool(dd["near_threshold"])
    write = [WriteShards(layout.shards, options["validation_fraction"])]
    first = [ReadFiles(files, options, layout.progress), Count("read"), QualityRules(options["filters"]),
             Count("passed")]
    if not exact and not near:
        return [Stage("filter", first + write, tasks)]
    result = []
    if exact:
        config = dedup.exact_config()
        result += [Stage("filter", first + [_jsonl(layout.ruled), ExactDedupSignature(layout.exact_sigs, config)],
                         tasks),
                   Stage("exact_find", [ExactFindDedups(layout.exact_sigs, layout.exact_dups, config)], 1)]
        unique = [ReadTask(layout.ruled), ExactDedupFilter(layout.exact_dups, config), Count("unique")]
    else:
        unique = first
    if not near:
        return result + [Stage("exact_filter", unique + write, tasks)]
    minhash = dedup.minhash_config(dd)
    signatures = dedup.ShingleSignature(layout.near_sigs, minhash, dd["num_perm"], layout.near_shingles)
    result += [Stage("exact_filter" if exact else "filter", unique + [_jsonl(layout.unique), signatures], tasks),
               Stage("near_buckets", [MinhashDedupBuckets(layout.near_sigs, layout.near_buckets, config=minhash)],
                     minhash.num_buckets),
               Stage("near_cluster", [VerifiedCluster(layout.near_buckets, layout.near_remove, layout.near_shingles,
                                                      dd["near_threshold"])], 1),
               Stage("write", [ReadTask(layout.unique), MinhashDedupFilter(layout.near_remove), Count("kept")]
                     + write, tasks)]
    return result
