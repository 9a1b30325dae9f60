"""One corpus's datatrove build, from its TFDS builder to the dataset in place.

`run(builder, ...)` builds the dataset `builder` names (its files and options) unless it
is already built, into `<config dir>/incomplete.datatrove-<tasks>/`, and `finish` moves
the finished dataset to `builder.data_dir` with one rename, so a build that fails (or
is killed) leaves no directory TFDS would take for a dataset; rerun, it resumes the
tasks it had not finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_collections
from datatrove.pipeline.base import PipelineStep

from lm.data import cleaning, text_files
from lm.data.build import executors, report, shards
from lm.data.build.dedup import MAX_TASKS
from lm.data.build.read import Progress
from lm.data.build.stages import Layout, Stage, stages
from lm.data.sources import check_inputs


def layout_of(builder: text_files.TextFiles, tasks: int) -> Layout:
    # Named by the tasks: datatrove's records of finished tasks hold for one partition of the files.
    return Layout(os.path.join(os.path.dirname(builder.data_dir), f"incomplete.datatrove-{tasks}"))


is_built = text_files.is_built


def finish(builder: text_files.TextFiles, layout: Layout, stage_names: list[str]) -> str:
    """Merges the report from the stages' stats, checks both splits have documents, writes
    the dataset info beside the shards, renames the dataset into place and deletes the
    intermediate files. Returns `builder.data_dir`. Raises CorpusError (as the in-memory
    build does) when nothing, or no document of one split, survived cleaning."""
    options = json.loads(builder.builder_config.options)
    counts = report.merged_counts(os.path.join(layout.logs(name), "stats") for name in stage_names)
    rules = [name for name, _ in cleaning.quality_rules(ml_collections.ConfigDict(options["filters"]))]
    result = report.build_report(counts, rules)
    text_files.check_kept(builder.builder_config.files, options, result["read"]["documents"],
                          {split: tally["documents"] for split, tally in result["splits"].items()})
    shards.assemble(builder, layout.shards, layout.dataset, result, report.split_bytes(counts))
    os.rename(layout.dataset, builder.data_dir)  # the one step that makes it look complete
    shutil.rmtree(layout.work, ignore_errors=True)
    return builder.data_dir


class Finish(PipelineStep):
    """`finish` as a one-task stage: the last Slurm job, once every stage's tasks are done."""

    name = "lm dataset assembly"
    type = "💽 - WRITER"

    def __init__(self, builder: text_files.TextFiles, tasks: int, stage_names: list[str]):
        super().__init__()
        config = builder.builder_config  # the builder itself does not pickle; its name, files and options do
        self.builder_args = (config.name, config.files, config.options, os.fspath(builder.data_dir))
        self.tasks, self.stage_names = tasks, stage_names

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name, files, options, version_dir = self.builder_args
        builder = text_files.TextFiles(config=text_files.TextFilesConfig(name=name, files=files, options=options),
                                       data_dir=str(Path(version_dir).parents[2]), file_format="array_record")
        finish(builder, layout_of(builder, self.tasks), self.stage_names)
        yield from ()


def _resubmit_slurm(jobs, planned: list[Stage], layout: Layout) -> None:
    """Submits the build's jobs unless its last submission's are still queued or running
    (two submissions would run the same tasks at once, into the same files): then it prints
    the build's progress instead. A resubmission says which tasks failed last time; datatrove
    runs only the unfinished tasks again."""
    live = executors.live_slurm_jobs(layout)
    if live:
        docs, num_bytes = Progress(layout.progress).totals()
        print(f"this build's Slurm jobs {', '.join(live)} are queued or running: not submitting again. "
              f"Its tasks have read {docs:,} documents, {num_bytes / 1e6:,.1f} MB so far.")
        return
    for line in executors.failed_tasks(planned, layout):
        print(f"the last attempt's {line}")
    executors.submit_slurm(jobs, layout)


def run(builder: text_files.TextFiles, *, executor: str = "local", workers: int = 0, tasks: int = 0,
        dry_run: bool = False, executor_options: dict | None = None) -> str:
    """Builds `builder`'s dataset with datatrove unless it is built; returns its directory.

    `tasks`: how many parts the files are read in (0: one per file, the most that keeps
    memory per task to one file); `workers`: tasks run at once (0: one per core; on Slurm,
    no limit). `executor`: "local", "slurm" (submits and returns at once: the dataset
    appears when the last job ends; with `dry_run`, prints the sbatch scripts and submits
    nothing) or "ray" (on the cluster `ray.init` finds, or `executor_options["address"]`).
    `executor_options`: `executors.SLURM_DEFAULTS` / `RAY_DEFAULTS` keys.
    Raises CorpusError for a file that cannot be read or a corpus that cleaning empties.
    """
    if is_built(builder) and not dry_run:
        return builder.data_dir
    files = builder.builder_config.files
    options = json.loads(builder.builder_config.options)
    check_inputs(files, options)
    tasks = max(1, min(tasks or len(files), len(files), MAX_TASKS))
    layout = layout_of(builder, tasks)
    planned = stages(files, options, layout, tasks)
    names = [stage.name for stage in planned]
    if executor == "slurm":
        planned.append(Stage("finish", [Finish(builder, tasks, names)], 1))
        jobs = executors.slurm_executors(planned, layout, workers, executor_options or {},
                                         f"lm_{builder.builder_config.name}")
        if dry_run:
            for stage, script in zip(planned, executors.sbatch_scripts(jobs)):
                print(f"# stage {stage.name}: {stage.tasks} task(s)\n{script}")
        else:
            _resubmit_slurm(jobs, planned, layout)
        return builder.data_dir
    if executor == "ray":
        executors.run_ray(planned, layout, workers or os.cpu_count() or 1, executor_options or {})
    else:
        executors.run_local(planned, layout, workers or os.cpu_count() or 1)
    return finish(builder, layout, names)
