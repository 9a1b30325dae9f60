"""The corpus build as a datatrove pipeline, in memory that does not grow with the corpus.

`config.data.build = "datatrove"` builds a corpus with these stages instead of the
in-memory builder (`lm.data.text_files`): the same documents read, the same
normalisation and quality rules (`lm.data.cleaning`), exact and MinHash near dedup with
datatrove's multi-stage dedup (signatures and bucket files on disk), the same hash
split, the ArrayRecord shards written task by task, the same TFDS dataset info and
cleaning report. `lm.data.corpus` opens either result the same way.

read.py      each task's share of the files as documents; the progress line
filters.py   the quality rules as a datatrove filter; the counts the report is made of
dedup.py     config.data.dedup as datatrove's exact and MinHash stages (threshold -> bands)
near.py      near-dup candidates verified by exact Jaccard (shingle hashes on disk, clusters)
shards.py    the hash split and ArrayRecord shards; the TFDS dataset around them
stages.py    the stages in order and where they keep their files
report.py    the cleaning report merged from the stages' stats
executors.py datatrove's local, Slurm and Ray executors
driver.py    one corpus: run the stages, assemble, rename into place

`run(builder, executor=, workers=, tasks=, dry_run=, executor_options=)` builds one
corpus; `lm.data.corpus.builders(config, **build)` builds every corpus of a config.
"""

from lm.data.build.driver import is_built, run

__all__ = ["is_built", "run"]
