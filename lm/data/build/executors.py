"""Running the stages: datatrove's local, Slurm and Ray executors.

`local`: `LocalPipelineExecutor`, stage after stage, `workers` tasks at a time in worker
processes, with a progress line while the files are read. `ray`: `RayPipelineExecutor`
on the Ray cluster `ray.init` finds (or the one at `ray_address`), stage after stage
from this process, with the same progress line (the tasks write their progress to the
build's folder, which the cluster shares). A task that fails on either raises its error
here (`raise_failed`): a file that cannot be read is one CorpusError naming it. `slurm`:
one `SlurmPipelineExecutor` job array per stage, each depending on the one before, and a
last one-task job that assembles the dataset; `submit` returns once they are queued.
Every executor records a task's completion, so a build that failed (or a job that was
preempted) reruns only its unfinished tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor

from lm.data.build.read import Progress
from lm.data.build.stages import Layout, Stage
from lm.data.documents import CorpusError
from lm.errors import UsageError

EXECUTORS = ("local", "slurm", "ray")
# Executor options (`lm.prepare` flags without their `slurm_`/`ray_` prefix) and defaults.
SLURM_DEFAULTS = dict(partition="", time="24:00:00", cpus_per_task=1, mem_per_cpu_gb=2, qos="normal",
                      venv_path="", env_command="", sbatch_args={})
RAY_DEFAULTS = dict(address="", cpus_per_task=1, mem_per_cpu_gb=2)


class _RecordsErrors:
    """A task that fails writes its error to the stage's `errors/<rank>.json` before it
    re-raises: executors report a failed task differently (the local one raises it here;
    Ray's logs it and returns; a Slurm job just fails), and `raise_failed` turns the record
    into one message, naming the file, whatever ran the task."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        except Exception as e:
            with self.logging_dir.open(f"errors/{rank:05d}.json", "w") as f:
                json.dump({"corpus_error": isinstance(e, CorpusError), "type": type(e).__name__,
                           "message": str(e)}, f)
            raise


def raise_failed(stage: Stage, layout: Layout, executor) -> None:
    """Raises, after a stage ran, for the first of its tasks that failed (CorpusError for a
    corpus file that cannot be read, as `read` raises it) or did not finish."""
    for rank, error in recorded_errors(stage, layout)[:1]:
        if error["corpus_error"]:
            raise CorpusError(error["message"])
        raise RuntimeError(f"task {rank} of the build's {stage.name} stage failed: "
                           f"{error['type']}: {error['message']} (its log: {layout.logs(stage.name)}/logs/)")
    unfinished = executor.get_incomplete_ranks(range(stage.tasks))
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} task(s) of the build's {stage.name} stage did not finish (first: "
                           f"{unfinished[0]}; logs in {layout.logs(stage.name)}/logs/). Fix: rerun the same "
                           "command: the build resumes from the tasks that finished.")


def recorded_errors(stage: Stage, layout: Layout) -> list[tuple[int, dict]]:
    """(rank, error record) of each of the stage's tasks that recorded a failure, by rank."""
    errors = os.path.join(layout.logs(stage.name), "errors")
    records = []
    for name in sorted(os.listdir(errors)) if os.path.isdir(errors) else ():
        with open(os.path.join(errors, name), encoding="utf-8") as f:
            records.append((int(name.split(".")[0]), json.load(f)))
    return records


def _clear_errors(stage: Stage, layout: Layout) -> None:
    shutil.rmtree(os.path.join(layout.logs(stage.name), "errors"), ignore_errors=True)  # a rerun's slate


class _RayTasks(_RecordsErrors, RayPipelineExecutor):
    pass


class _SlurmTasks(_RecordsErrors, SlurmPipelineExecutor):
    pass


class _QuietLocal(_RecordsErrors, LocalPipelineExecutor):
    """A task's console output (datatrove's log lines, its steps' tqdm bars) goes to the stage's
    `logs/task_<rank>.stderr`; the console keeps the progress line, and errors are raised."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        from loguru import logger

        logger.disable("datatrove.executor.local")  # its "k/N tasks completed", once per task
        with self.logging_dir.open(f"logs/task_{rank:05d}.stderr", "w") as err, contextlib.redirect_stderr(err):
            return super()._run_for_rank(rank, local_rank, node_rank)


@contextlib.contextmanager
def _quiet_datatrove():
    from loguru import logger

    logger.disable("datatrove")  # this process only: its executor's chatter and in-process tasks
    try:
        yield
    finally:
        logger.enable("datatrove")


@contextlib.contextmanager
def _forkserver():
    """Lean workers: datatrove's pool starts them from a forkserver, which first imports
    `lm.data.build` here (by default `__main__`), and each worker then imports the module
    the parent runs as `__main__` (multiprocessing's "main fixup"): `lm.prepare` or
    `lm.main` bring JAX, ~135 MB more in every worker, and a script without a main guard
    would run again. The build's steps live in `lm.data.build`, so `__main__` is hidden
    from the workers while they start. datatrove's Manager process forks this one (from
    the forkserver it measured 60 MB larger), except in a process that imported JAX (a
    run tokenizing at start-up), which must not fork: there it starts from the forkserver."""
    import multiprocess

    multiprocess.set_forkserver_preload(["lm.data.build"])
    main = sys.modules["__main__"]
    hidden = {key: main.__dict__.pop(key) for key in ("__spec__", "__file__") if key in main.__dict__}
    main.__spec__ = None  # no module name and no file: nothing for a worker to import as main
    default = multiprocess.get_start_method(allow_none=True)
    if "jax" in sys.modules:  # a training run tokenizing at start-up: JAX's threads make fork unsafe
        multiprocess.set_start_method("forkserver", force=True)  # for datatrove's Manager too
    try:
        yield
    finally:
        del main.__spec__
        main.__dict__.update(hidden)
        multiprocess.set_start_method(default, force=True)


@contextlib.contextmanager
def _progress_line(progress: Progress, every: float = 5.0):
    """Prints `progress.line()` every `every` seconds while the block runs, and once at its end."""
    done = threading.Event()
    stream = sys.stdout  # looked up now: a caller may have redirected it

    def loop() -> None:
        while not done.wait(every):
            print(progress.line(), file=stream, flush=True)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(progress.line(), file=stream, flush=True)


def _run_stage(stage: Stage, stages: Sequence[Stage], layout: Layout, executor) -> None:
    """Runs one stage with `executor` (the progress line while the first reads the files),
    prints its time, and raises for a task that failed (`raise_failed`)."""
    _clear_errors(stage, layout)
    start = time.monotonic()
    with _progress_line(Progress(layout.progress)) if stage is stages[0] else contextlib.nullcontext():
        executor.run()
    raise_failed(stage, layout, executor)
    print(f"stage {stage.name}: {stage.tasks} task(s) in {time.monotonic() - start:.1f} s", flush=True)


def run_local(stages: Sequence[Stage], layout: Layout, workers: int) -> None:
    """Runs the stages here, `workers` tasks at a time."""
    with _quiet_datatrove(), _forkserver():
        for stage in stages:
            executor = _QuietLocal(stage.pipeline, tasks=stage.tasks, workers=max(1, min(workers, stage.tasks)),
                                   logging_dir=layout.logs(stage.name))
            _run_stage(stage, stages, layout, executor)


def run_ray(stages: Sequence[Stage], layout: Layout, workers: int, options: dict) -> None:
    """Runs the stages on a Ray cluster (started by the caller, or found at `options["address"]`)."""
    options = {**RAY_DEFAULTS, **options}
    init_ray(options["address"])
    with _quiet_datatrove():
        for stage in stages:
            executor = _RayTasks(stage.pipeline, tasks=stage.tasks, workers=max(1, min(workers, stage.tasks)),
                                 logging_dir=layout.logs(stage.name), cpus_per_task=options["cpus_per_task"],
                                 mem_per_cpu_gb=options["mem_per_cpu_gb"])
            _run_stage(stage, stages, layout, executor)


def init_ray(address: str, timeout: float = 5.0) -> None:
    """Connects to the Ray cluster at `address` ('' or "auto": the one `ray.init` finds),
    unless connected. Raises UsageError naming --ray_address when nothing answers at the
    address (checked first: Ray itself retries an unanswered address for a long time)."""
    import ray

    if ray.is_initialized():
        return
    if address and address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
        except (OSError, ValueError) as e:
            raise _ray_error(address, str(e) or type(e).__name__) from None
    try:
        ray.init(address=address or None)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        raise _ray_error(address, str(e)) from None


def _ray_error(address: str, problem: str) -> UsageError:
    return UsageError(f"--ray_address={address!r}: no Ray cluster answers ({problem}). Fix: give the address of a "
                      "running cluster's head (host:6379, or ray://host:10001), or leave --ray_address out to start "
                      "a local one.")


def slurm_executors(stages: Sequence[Stage], layout: Layout, workers: int, options: dict, job_name: str):
    """One SlurmPipelineExecutor per stage, each depending on the one before."""
    options = {**SLURM_DEFAULTS, **options}
    if not options["partition"]:
        from lm.data.documents import CorpusError

        raise CorpusError("--executor=slurm needs a partition. Fix: pass --slurm_partition=<partition>.")
    executors, before = [], None
    for stage in stages:
        before = _SlurmTasks(
            stage.pipeline, tasks=stage.tasks, workers=workers if workers > 0 else -1, depends=before,
            time=options["time"], partition=options["partition"], cpus_per_task=options["cpus_per_task"],
            mem_per_cpu_gb=options["mem_per_cpu_gb"], qos=options["qos"], venv_path=options["venv_path"] or None,
            env_command=options["env_command"] or None, sbatch_args=dict(options["sbatch_args"]),
            job_name=f"{job_name}_{stage.name}", logging_dir=layout.logs(stage.name),
            slurm_logs_folder=layout.logs(f"slurm/{stage.name}"))
        executors.append(before)
    return executors


def sbatch_scripts(executors) -> list[str]:
    """The sbatch script each Slurm stage would submit (what `launch_job` writes), without submitting."""
    scripts = []
    for executor in executors:
        array = min(executor.tasks, executor.max_array_size)
        pickled = executor.logging_dir.resolve_paths("executor.pik")
        command = (f"srun -l -n {executor.nodes_per_task} launch_pickled_pipeline {pickled}"
                   if executor.with_srun else f"launch_pickled_pipeline {pickled}")
        scripts.append(executor.get_launch_file_contents(executor.get_sbatch_args(array), command))
    return scripts


SLURM_JOBS = "slurm_jobs.json"  # in the build's folder: the job ids of its last submission


def submit_slurm(executors, layout: Layout, print_fn: Callable[[str], None] = print) -> None:
    """Queues the stages' job arrays (the last launches the ones it depends on) and records
    their job ids, by which `live_slurm_jobs` tells a rerun they are still queued or running."""
    executors[-1].run()
    ids = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]  # -1: every task done before
    os.makedirs(layout.work, exist_ok=True)
    with open(os.path.join(layout.work, SLURM_JOBS), "w", encoding="utf-8") as f:
        json.dump(ids, f)
    print_fn(f"submitted {len(ids)} Slurm job arrays ({', '.join(ids)}); the last ({executors[-1].job_name}) "
             "assembles the dataset. Rerun the same command for the build's progress.")


def live_slurm_jobs(layout: Layout) -> list[str]:
    """The jobs of the build's last submission that `squeue` still lists (queued or running)."""
    path = os.path.join(layout.work, SLURM_JOBS)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        ids = json.load(f)
    if not ids:
        return []
    listed = subprocess.run(["squeue", "--noheader", "--format=%i", f"--jobs={','.join(ids)}"],
                            capture_output=True, text=True, check=False).stdout.split()
    return sorted({job.split("_")[0] for job in listed} & set(ids))  # an array's tasks show as <id>_<task>


def failed_tasks(stages: Sequence[Stage], layout: Layout) -> list[str]:
    """One line per task a stage's last attempt recorded as failed (`_RecordsErrors`); clears
    the records, since the tasks are about to run again."""
    lines = []
    for stage in stages:
        lines += [f"task {rank} of stage {stage.name}: {error['message']}"
                  for rank, error in recorded_errors(stage, layout)]
        _clear_errors(stage, layout)
    return lines
