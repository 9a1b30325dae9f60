"""Run every point of a sweep and collect one results table.

    python -m lm.sweep --config=configs/scaling/shakespeare_isoflop.py --workdir=/tmp/isoflop --parallel=2

Each point of the config file's `get_sweep()` trains with `python -m lm.main` in
`<workdir>/points/<name>/`; finished points are skipped and interrupted ones resume from
their checkpoints, so rerunning the same command after a kill finishes the sweep. After
each point, `<workdir>/results.csv` (and `.jsonl`) gains its row: N, non-embedding N,
tokens D, FLOPs C, final train and validation loss, wall time, the overrides. Then fit:
`python -m lm.fit_scaling --results=<workdir>/results.csv`.

`--launcher=slurm` submits the unfinished points as one SLURM array job instead
(`launch/slurm_sweep.sbatch`), `--launcher=tpu_pod` runs them one after another on a TPU
pod through `launch/tpu_pod.sh`; `--dry_run` prints what would run or be submitted.

A point that branches from another's checkpoint (`train.branch_from=points/<name>`, as
`lm.scaling.designs.wsd_branches` writes) starts once that checkpoint is on disk: locally
it waits in the queue while its parent trains; on SLURM, branches of unfinished parents are
a second array job that depends on the first (`--dependency=afterok`); on a TPU pod they
run after the other points.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
from absl import app, flags

from lm.config import parse_flags, validate
from lm.errors import PREEMPTED, UsageError, exit_with_error, quiet_logging, reject_positional
from lm.files import atomic, paths
from lm.parallel import runtime
from lm.runs import checkpoint
from lm.scaling import branches, sweeps

_CONFIG = flags.DEFINE_string("config", None, "A config file with get_config() and get_sweep(), [path[:arg]].")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (points/, results.csv).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at once on this machine; on CPU each gets "
                                 "cores / parallel devices.", lower_bound=1)
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "slurm", "tpu_pod"], "Where the points run.")
_LAUNCHER_ARGS = flags.DEFINE_list("launcher_args", [], "Extra arguments for the launch script, e.g. "
                                   "--launcher_args=--nodes=1,--gpus_per_node=8 or --name=pod,--zone=...")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What each launcher submits with (launch/tpu_pod.sh calls gcloud), and where that is installed.
LAUNCHER_PROGRAMS = {"slurm": ("sbatch", "a SLURM login node"), "tpu_pod": ("gcloud", "the Google Cloud CLI installed")}


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    if not _CONFIG.value or not _WORKDIR.value:
        exit_with_error("--config and --workdir are required, e.g. --config=configs/scaling/shakespeare_isoflop.py "
                        "--workdir=/tmp/isoflop")
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        points, steps, pending = _plan(workdir)
        print(f"sweep {_CONFIG.value}: {len(points)} points, {len(points) - len(pending)} finished, "
              f"{len(pending)} to run", flush=True)
        failed = (_run_local(workdir, pending, points, steps) if _LAUNCHER.value == "local"
                  else _submit(workdir, pending))
        if not _DRY_RUN.value and _LAUNCHER.value == "local":
            finished = [p for p in points if sweeps.is_finished(workdir, p, steps[p.name])]
            rows = sweeps.result_rows(workdir, finished, points, steps)
            if rows:
                path = sweeps.write_results(workdir, rows)
                stable = len(branches.parents(points))
                print(f"results: {len(rows)} of {len(points) - stable} points in {path}"
                      + (f" ({stable} stable run(s) counted in their branches' spent columns)" if stable else ""),
                      flush=True)
    except UsageError as e:
        exit_with_error(str(e))
    if failed:
        exit_with_error(f"{len(failed)} point(s) failed: {', '.join(failed)}; each one's log is "
                        "points/<name>/sweep.log. Rerun the same command to retry them.", code=1)


def _plan(workdir: str) -> tuple[list[sweeps.Point], dict[str, int], list[sweeps.Point]]:
    """(points, their step counts, the unfinished ones), once everything that can be checked
    before a point runs is: the workdir, the launcher's program, every point's config, and
    the files already in the workdir."""
    paths.check_output_dir(_WORKDIR.value, "--workdir")
    program, where = LAUNCHER_PROGRAMS.get(_LAUNCHER.value, (None, ""))
    if program and not _DRY_RUN.value and shutil.which(program) is None:
        raise UsageError(f"--launcher={_LAUNCHER.value} submits with `{program}`, which is not installed here. "
                         f"Fix: run the sweep on a machine with {where}, print the commands with --dry_run, "
                         "or train here with --launcher=local.")
    points, configs = _checked_points(_CONFIG.value)
    if changed := sweeps.changed_points(workdir, points, configs):
        raise UsageError(f"{len(changed)} point(s) in {workdir} ran with another config than this sweep gives them "
                         f"(point names hash only the overrides): {sweeps.describe_changes(changed)}. Fix: rerun "
                         "with the sweep file and argument they ran with, or give this sweep its own --workdir.")
    if _LAUNCHER.value == "local" and not _DRY_RUN.value:
        sweeps.read_results(workdir)  # a damaged table fails now, not once the first point has trained
    steps = {name: config.train.steps for name, config in configs.items()}
    return points, steps, [p for p in points if not sweeps.is_finished(workdir, p, steps[p.name])]


def _checked_points(config_arg: str) -> tuple[list[sweeps.Point], dict[str, ml_collections.ConfigDict]]:
    """The points, each validated with its overrides applied, and their configs by name."""
    base, points = sweeps.load(config_arg)
    configs = {}
    for point in points:
        configs[point.name] = config = sweeps.apply(base, point)
        try:
            validate(config)
        except UsageError as e:
            raise UsageError(f"{point.label}: {e}") from None
    branches.check(points, configs)
    return points, configs


def command(workdir: str, point: sweeps.Point, cpu_devices: int = 0) -> list[str]:
    """The lm.main command line that trains `point` here."""
    return [sys.executable, "-m", "lm.main", *main_args(workdir, point, os.path.abspath(_config_path()), cpu_devices)]


def main_args(workdir: str, point: sweeps.Point, config_path: str, cpu_devices: int = 0) -> list[str]:
    """lm.main's arguments for `point` (the config path as given, for a launcher's hosts)."""
    resolved = dataclasses.replace(point, overrides=branches.resolved(point.overrides, workdir))
    args = [f"--config={config_path}{_config_arg()}", f"--workdir={sweeps.point_dir(workdir, point)}",
            *resolved.flags()]
    if cpu_devices and "mesh.cpu_devices" not in point.overrides:
        args.append(f"--config.mesh.cpu_devices={cpu_devices}")
    return args


def _config_path() -> str:
    return _CONFIG.value.partition(":")[0]


def _config_arg() -> str:
    arg = _CONFIG.value.partition(":")[2]
    return f":{arg}" if arg else ""


def _run_local(workdir: str, pending: list[sweeps.Point], points: list[sweeps.Point], steps: dict[str, int]
               ) -> list[str]:
    """Trains the pending points, `--parallel` at a time, each branch once its parent's
    checkpoint is on disk; returns the names that failed."""
    cpu_devices = max(1, runtime.available_cores() // _PARALLEL.value) if _PARALLEL.value > 1 else 0
    if _DRY_RUN.value:
        for point in pending:
            print(shlex.join(command(workdir, point, cpu_devices)))
        return []
    queue, running, failed, stopping = list(pending), {}, [], []

    def stop(signum, frame):  # pass a preemption on: each point checkpoints and exits 75
        stopping.append(signum)
        for process, _, _ in running.values():
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (queue and not stopping):
            while queue and len(running) < _PARALLEL.value and not stopping:
                point = _next_startable(workdir, queue, running, failed)
                if point is None:  # every queued point is a branch waiting for its parent's checkpoint
                    break
                running[point.name] = (_start(workdir, point, cpu_devices), point, time.monotonic())
                print(f"started {point.name} ({len(pending) - len(queue)} of {len(pending)} to run): "
                      f"{' '.join(point.flags())}", flush=True)
            time.sleep(0.5)
            for name, (process, point, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                seconds = time.monotonic() - started
                sweeps.add_wall_seconds(workdir, point, seconds)
                if process.returncode == 0:
                    _report_finished(workdir, point, points, steps, seconds)
                elif not stopping:  # a point stopped by our signal resumes on the rerun
                    failed.append(name)
                    print(f"FAILED {name} (exit {process.returncode}); see {sweeps.point_dir(workdir, point)}"
                          "/sweep.log", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        exit_with_error("stopped by a signal; every running point saved a checkpoint. Rerun the same command "
                        "to resume the sweep.", code=PREEMPTED)
    return failed


def _next_startable(workdir: str, queue: list[sweeps.Point], running: dict, failed: list[str]
                    ) -> sweeps.Point | None:
    """Takes from `queue` the first point that can start: one that is no branch, or whose
    parent has written its branch step, or whose parent will not run here (lm.main then
    names the missing checkpoint). Branches of failed parents fail without running."""
    waiting = set(running) | {p.name for p in queue}
    for point in list(queue):
        parent = branches.parent_name(point.overrides)
        if parent in failed:
            queue.remove(point)
            failed.append(point.name)
            print(f"FAILED {point.name}: it branches from {parent}, which failed", file=sys.stderr, flush=True)
            continue
        directory = os.path.join(workdir, "points", parent or "", "checkpoints")
        if parent is None or parent not in waiting or branches.ready(point, checkpoint.finished_steps(directory)):
            queue.remove(point)
            return point
    return None


def _report_finished(workdir: str, point: sweeps.Point, points: list[sweeps.Point], steps: dict[str, int],
                     seconds: float) -> None:
    """Adds a finished point's row to the results (a stable run has none) and prints it."""
    rows = sweeps.result_rows(workdir, [point], points, steps)
    if not rows:
        print(f"finished {point.name} in {seconds:.0f} s: the stable run of its branches", flush=True)
        return
    row = rows[0]
    sweeps.write_results(workdir, [row])
    print(f"finished {point.name} in {seconds:.0f} s: N={row['parameters']:,} D={row['tokens']:,} "
          f"C={row['flops']:.3g} val loss {row['val_loss']:.4f}", flush=True)


def _start(workdir: str, point: sweeps.Point, cpu_devices: int) -> subprocess.Popen:
    directory = sweeps.point_dir(workdir, point)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "sweep.log"), "a", encoding="utf-8") as log:  # the child keeps its copy
        return subprocess.Popen(command(workdir, point, cpu_devices), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_terminate_with_parent)


def _terminate_with_parent() -> None:
    """Linux: a point gets SIGTERM (and checkpoints) if the sweep runner dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _submit(workdir: str, pending: list[sweeps.Point]) -> list[str]:
    """Submits the pending points through a launch script (or prints how, with --dry_run):
    on SLURM one array job, and a second one after it (`--dependency=afterok`) for the
    branches of points in the first; on a TPU pod one run after another, branches last."""
    if not pending:
        return []
    extra = list(_LAUNCHER_ARGS.value)
    if _LAUNCHER.value == "slurm":
        names = {p.name for p in pending}
        later = [p for p in pending if branches.parent_name(p.overrides) in names]
        first = [p for p in pending if p not in later]
        job = _submit_array(workdir, first, "slurm_points.txt", extra, parsable=bool(later))
        if later:
            _submit_array(workdir, later, "slurm_branches.txt", [*extra, f"--dependency=afterok:{job}"])
    else:
        for point in sorted(pending, key=lambda p: branches.parent_name(p.overrides) is not None):
            _launch(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), *extra, "--",
                     *main_args(workdir, point, _config_path())])
    if not _DRY_RUN.value:
        print(f"submitted; when the points finish, rerun this command with --launcher=local to collect "
              f"{workdir}/results.csv (finished points are not rerun).", flush=True)
    return []


def _submit_array(workdir: str, points: list[sweeps.Point], name: str, extra: list[str], parsable: bool = False
                  ) -> str:
    """Writes the points file `name` (one line of lm.main arguments per point) and submits
    it as one array job; returns its job id (`parsable`: sbatch prints it) or a placeholder."""
    points_file = os.path.join(workdir, name)
    lines = [shlex.join(main_args(workdir, p, _config_path())) for p in points]
    submit = ["sbatch", f"--array=0-{len(points) - 1}%{_PARALLEL.value}", *(["--parsable"] if parsable else []),
              *extra, f"--export=ALL,LM_REPO={REPO}", os.path.join(REPO, "launch", "slurm_sweep.sbatch"), points_file]
    if not _DRY_RUN.value:
        os.makedirs(workdir, exist_ok=True)
        atomic.write_text(points_file, "\n".join(lines) + "\n")
    else:
        print(f"# {points_file}, one line per array task:")
        for line in lines:
            print(f"#   {line}")
    output = _launch(submit, capture=parsable)
    return output.strip().split(";")[0] if output else "FIRST_JOB_ID"  # a dry run has none


def _launch(cmd: list[str], capture: bool = False) -> str:
    """Runs (or, with --dry_run, prints) a submission command; its stdout when `capture`."""
    print(("" if _DRY_RUN.value else "+ ") + shlex.join(cmd), flush=True)
    if _DRY_RUN.value:
        return ""
    done = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode:
        exit_with_error(f"`{shlex.join(cmd[:1])}` exited {done.returncode}; its output is above. Fix: see that "
                        "output, then rerun the same command (finished points are not submitted again).", code=1)
    if capture:
        print(done.stdout, end="", flush=True)
    return done.stdout or ""


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
