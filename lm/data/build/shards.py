"""The trainer's ArrayRecord shards, written task by task, and the TFDS dataset around them.

`WriteShards` assigns each kept document to `train` or `validation` by its hash (the
in-memory build's `split="hash"`) and appends its TFDS record (the builder's features,
serialised by TFDS's own serializer) to this task's shard of that split, directly with
`array_record` (`group_size:1`, as TFDS writes them): one record at a time in memory.
`assemble` then names the non-empty shards as TFDS names them, in task order (so the
records are in corpus order), and writes the builder's dataset info beside them;
`tfds.builder(...)`, `as_data_source()` and Grain read the result as they read an
in-memory build.
"""

from __future__ import annotations

import os

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lm.data import text_files
from lm.data.build.filters import tally

SPLITS = ("train", "validation")
ARRAY_RECORD_OPTIONS = "group_size:1"  # TFDS's: one record per chunk, for random access


def split_of(text: str, validation_fraction: float) -> str:
    """The in-memory build's hash split (`split="hash"`): it depends on the text alone."""
    return "validation" if text_files._unit_hash(text) < validation_fraction else "train"  # noqa: SLF001


def task_shard(shard_dir: str, split: str, rank: int) -> str:
    return os.path.join(shard_dir, f"{split}-{rank:05d}.array_record")


class WriteShards(PipelineStep):
    """Writes this task's documents into one ArrayRecord shard per split (`task_shard`)."""

    name = "lm ArrayRecord shards"
    type = "💽 - WRITER"

    def __init__(self, shard_dir: str, validation_fraction: float):
        super().__init__()
        self.shard_dir, self.validation_fraction = shard_dir, validation_fraction

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import tensorflow_datasets as tfds  # imported by the tasks that write, not by every stage
        from array_record.python.array_record_module import ArrayRecordWriter

        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
        serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
        os.makedirs(self.shard_dir, exist_ok=True)
        writers = {split: ArrayRecordWriter(task_shard(self.shard_dir, split, rank), ARRAY_RECORD_OPTIONS)
                   for split in SPLITS}
        try:
            for doc in data:
                split = split_of(doc.text, self.validation_fraction)
                with self.track_time():
                    record = serializer.serialize_example(features.encode_example({"text": doc.text}))
                    writers[split].write(record)
                tally(self, f"splits.{split}", doc.text)
                self.stat_update(f"lm.splits.{split}.bytes", value=len(record))
        finally:
            for writer in writers.values():
                writer.close()
        yield from ()


def assemble(builder: text_files.TextFiles, shard_dir: str, version_dir: str, report: dict,
             split_bytes: dict[str, int]) -> None:
    """Moves the tasks' non-empty shards into `version_dir` under TFDS's names and writes the
    builder's dataset info (features, split infos with shard lengths, the report as metadata)."""
    import tensorflow_datasets as tfds

    os.makedirs(version_dir, exist_ok=True)
    infos = []
    for split in SPLITS:
        shards = sorted(name for name in os.listdir(shard_dir) if name.startswith(f"{split}-"))
        lengths = [_num_records(os.path.join(shard_dir, name)) for name in shards]
        kept = [(name, n) for name, n in zip(shards, lengths) if n]
        # Named for where the dataset will be (the builder reads through these), written where it is now.
        template = tfds.core.naming.ShardedFileTemplate(
            data_dir=builder.data_dir, dataset_name=builder.name, split=split,
            filetype_suffix=tfds.core.FileFormat.ARRAY_RECORD.file_suffix)
        for index, (name, _) in enumerate(kept):
            target = os.path.basename(template.sharded_filepath(shard_index=index, num_shards=len(kept)))
            os.replace(os.path.join(shard_dir, name), os.path.join(version_dir, target))
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n for _, n in kept],
                                         num_bytes=split_bytes[split], filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.metadata["report"] = report
    builder.info.write_to_directory(version_dir)


def _num_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()
