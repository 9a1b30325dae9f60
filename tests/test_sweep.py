"""Sweeps: every point trained once (resuming after a kill), one results table that only
grows, and fits with clear errors on tables that cannot support them."""

import csv
import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import REPO, cli_env, run_cli

from lm.errors import UsageError
from lm.scaling import sweeps

SWEEP = f"--config={os.path.join(REPO, 'tests', 'data', 'tiny_sweep.py')}"


def test_a_sweep_with_duplicate_points_or_an_unknown_field_is_refused_before_anything_runs(tmp_path):
    duplicate = run_cli("lm.sweep", f"{SWEEP}:duplicate", f"--workdir={tmp_path}", check=False)
    assert duplicate.returncode == 2
    assert "sweep points 0 and 3 are the same run" in duplicate.stderr
    assert "Fix: remove the duplicate" in duplicate.stderr
    unknown = run_cli("lm.sweep", f"{SWEEP}:unknown_field", f"--workdir={tmp_path}", check=False)
    assert unknown.returncode == 2 and "sets 'model.width', which is not a config field" in unknown.stderr
    assert not os.path.exists(tmp_path / "points")


def test_a_dry_run_prints_each_points_training_command_or_the_slurm_array_submission(tmp_path):
    local = run_cli("lm.sweep", SWEEP, f"--workdir={tmp_path}", "--dry_run", "--parallel=2").stdout
    commands = [line for line in local.splitlines() if " -m lm.main " in line]
    assert len(commands) == 3 and all("--config.mesh.cpu_devices=" in c for c in commands)
    assert "--config.model.d_model=64 --config.train.steps=12 --config.sweep.budget=1000000000.0" in local
    slurm = run_cli("lm.sweep", SWEEP, f"--workdir={tmp_path}", "--dry_run", "--launcher=slurm",
                    "--parallel=2", "--launcher_args=--gpus-per-node=1").stdout
    assert "sbatch --array=0-2%2 --gpus-per-node=1 " in slurm and "launch/slurm_sweep.sbatch" in slurm
    assert f"--export=ALL,LM_REPO={REPO} " in slurm  # the job finds launch/slurm.sbatch from any directory
    pod = run_cli("lm.sweep", SWEEP, f"--workdir={tmp_path}", "--dry_run", "--launcher=tpu_pod",
                  "--launcher_args=--name=pod,--zone=us-central2-b").stdout
    assert pod.count("launch/tpu_pod.sh --name=pod --zone=us-central2-b -- --config=") == 3
    assert not os.path.exists(tmp_path / "points")  # a dry run writes nothing


@pytest.mark.slow
@pytest.mark.resume
def test_a_sweep_killed_midway_resumes_and_collects_one_row_per_point(tmp_path):
    runner = subprocess.Popen([sys.executable, "-m", "lm.sweep", SWEEP, f"--workdir={tmp_path}", "--parallel=2"],
                              cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not any(os.path.isdir(os.path.join(d, "checkpoints")) and os.listdir(os.path.join(d, "checkpoints"))
                  for d in _point_dirs(tmp_path)):
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
        time.sleep(0.2)
    runner.kill()  # -9: the points it started get SIGTERM (PR_SET_PDEATHSIG), checkpoint and stop
    runner.wait()
    stale = {"name": "earlier", "parameters": 1, "tokens": 1, "flops": 1, "val_loss": 9.9}
    with open(tmp_path / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(stale) + "\n")  # a row of a point no longer in the sweep: never dropped

    finished = run_cli("lm.sweep", SWEEP, f"--workdir={tmp_path}", "--parallel=2", timeout=300)
    assert "3 points, " in finished.stdout and "results: 3 of 3 points" in finished.stdout
    logs = "".join(open(os.path.join(d, "sweep.log"), encoding="utf-8").read() for d in _point_dirs(tmp_path))
    assert "resuming from the checkpoint at step" in logs
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and "earlier" in {r["name"] for r in rows}
    ours = [r for r in rows if r["name"] != "earlier"]
    assert {r["tokens"] for r in ours} == {str(40 * 8 * 16), str(12 * 8 * 16)}
    for row in ours:
        assert float(row["val_loss"]) > 0 and float(row["wall_seconds"]) > 0 and int(row["parameters"]) > 0
        assert float(row["flops"]) > 6 * int(row["parameters"]) * int(row["tokens"]) * 0.5
    again = run_cli("lm.sweep", SWEEP, f"--workdir={tmp_path}")
    assert "3 finished, 0 to run" in again.stdout  # finished points are skipped
    table = (tmp_path / "results.csv").read_bytes()
    reseeded = run_cli("lm.sweep", f"{SWEEP}:seed1", f"--workdir={tmp_path}", check=False)
    assert reseeded.returncode == 2 and reseeded.stderr.count("\n") == 1, reseeded.stderr
    assert ("3 point(s) in" in reseeded.stderr and "ran with another config than this sweep gives them"
            in reseeded.stderr and "config.seed was 0, now 1 (sweep points 0, 1, 2)" in reseeded.stderr
            and reseeded.stderr.count("config.seed") == 1), reseeded.stderr  # the change once, for the 3
    assert (tmp_path / "results.csv").read_bytes() == table  # the old results are not reported as the new sweep's


def _point_dirs(sweep_dir) -> list[str]:
    root = os.path.join(sweep_dir, "points")
    return [os.path.join(root, d) for d in os.listdir(root)] if os.path.isdir(root) else []


def write_table(path, rows, columns=sweeps.COLUMNS):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_fitting_a_table_with_missing_columns_or_too_few_runs_says_what_to_fix(tmp_path):
    write_table(tmp_path / "no_loss.csv", [{"parameters": 1e6, "tokens": 1e8}], columns=("parameters", "tokens"))
    missing = run_cli("lm.fit_scaling", f"--results={tmp_path / 'no_loss.csv'}", check=False)
    assert missing.returncode == 2 and "lacks the column(s) val_loss" in missing.stderr
    assert "Fix: name them with --n_column" in missing.stderr

    rows = [{"parameters": n, "tokens": 20 * n, "flops": 120 * n * n, "val_loss": 3 - 0.1 * i}
            for i, n in enumerate((1e6, 2e6, 4e6))]
    write_table(tmp_path / "three.csv", rows)
    three = run_cli("lm.fit_scaling", f"--results={tmp_path / 'three.csv'}", "--bootstrap=0")
    assert "L(N): E=0.0000" in three.stdout  # 3 frontier points: Kaplan's form, without the offset
    assert "approach_3: skipped: L(N, D) has 5 parameters (E, A, B, alpha, beta) and needs more runs" in three.stdout
    write_table(tmp_path / "two.csv", rows[:2])
    two = run_cli("lm.fit_scaling", f"--results={tmp_path / 'two.csv'}", check=False)
    assert two.returncode == 2 and "no law could be fitted" in two.stderr
    assert "needs at least 3 frontier points; got 2" in two.stderr
    assert open(tmp_path / "three.csv", encoding="utf-8").read().count("\n") == 4  # tables are only read


def test_fitting_checks_its_outputs_holdout_and_numbers_before_printing_anything(tmp_path):
    rows = [{"parameters": n, "tokens": 20 * n, "flops": 120 * n * n, "val_loss": 3 - 0.1 * i}
            for i, n in enumerate((1e6, 2e6, 4e6, 8e6, 16e6, 32e6, 64e6))]
    write_table(tmp_path / "seven.csv", rows)
    (tmp_path / "afile").write_text("keep me")
    table = f"--results={tmp_path / 'seven.csv'}"
    for flags, problem in ((["--holdout=3"], "--holdout=3 leaves 4 runs; Approach 3 needs more than 5"),
                           ([f"--plots={tmp_path}/afile/plots"], "lies under"),
                           ([f"--output={tmp_path}"], f"--output={tmp_path} is a directory"),
                           (["--bootstrap=-5"], "-5 is not a non-negative integer")):
        result = run_cli("lm.fit_scaling", table, *flags, check=False)
        assert result.returncode == 2 and result.stdout == "" and problem in result.stderr, result.stderr
        assert result.stderr.startswith("lm: error: ") and result.stderr.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_sweep_config_that_fails_or_returns_no_list_of_dicts_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "sweep.py"
    base = "def get_config(arg=''):\n    return {}\n"
    for body, problem in (("def get_sweep(:\n", "could not be loaded: SyntaxError: invalid syntax (line 3)"),
                          ("def get_sweep(arg=''):\n    raise ValueError('boom')\n",
                           "failed in get_sweep(): ValueError: boom (line 4)"),
                          ("def get_sweep(arg=''):\n    return 5\n", "returned 5. Fix: return a list of override"),
                          ("def get_sweep(arg=''):\n    return [5]\n", "returned [5]. Fix: return a list")):
        path.write_text(base + body)
        with pytest.raises(sweeps.SweepError, match=re.escape(problem)):
            sweeps.load(str(path))
    path.write_text(base + "def get_sweep(arg=''):\n    raise ValueError(f'unknown argument {arg!r}')\n")
    with pytest.raises(sweeps.SweepError, match=re.escape("unknown argument 'bad' (line 4). Fix: correct the file "
                                                          "or its argument 'bad'.")):
        sweeps.load(f"{path}:bad")  # the argument may be what is wrong, not the file
    assert sweeps.Point("71488681", {"model.d_model": 33}, 2).label == 'sweep point 2 ({"model.d_model": 33})'


def test_a_points_stored_config_is_compared_with_the_sweeps_a_field_it_predates_counting_as_its_default(tmp_path):
    base, points = sweeps.load(SWEEP.partition("=")[2])
    configs = {p.name: sweeps.apply(base, p) for p in points}
    stored = json.loads(configs[points[0].name].to_json_best_effort())
    del stored["model"]["scan_layers"]  # written by an lm before the field existed
    stored["mesh"]["cpu_devices"] = 2  # where it ran: lm.sweep --parallel
    stored["retired_field"] = 1  # a field lm no longer has
    os.makedirs(sweeps.point_dir(str(tmp_path), points[0]))
    with open(os.path.join(sweeps.point_dir(str(tmp_path), points[0]), "config.json"), "w") as f:
        json.dump(stored, f)
    assert sweeps.changed_points(str(tmp_path), points, configs) == []
    configs[points[0].name].seed = 7
    assert sweeps.changed_points(str(tmp_path), points, configs) == [(points[0], "config.seed was 0, now 7")]


def test_a_change_shared_by_several_points_is_named_once_with_their_indices():
    a, b, c = (sweeps.Point(name, {"optim.lr": lr}, i) for i, (name, lr) in enumerate([("a", 0.1), ("b", 0.2),
                                                                                        ("c", 0.3)]))
    changed = [(a, "config.seed was 0, now 1"), (b, "config.data.seq_len was 64, now 32"),
               (c, "config.seed was 0, now 1")]
    assert sweeps.describe_changes(changed) == (
        'config.seed was 0, now 1 (sweep points 0, 2) | config.data.seq_len was 64, now 32 (sweep point 1 '
        '({"optim.lr": 0.2}))')


def test_damaged_files_of_a_sweep_directory_are_named_with_the_fix_and_never_rewritten(tmp_path):
    point = sweeps.Point("abc", {"model.d_model": 32})
    os.makedirs(tmp_path / "points" / "abc")
    (tmp_path / "points" / "abc" / "final_metrics.json").write_text('{"step": 4,\n')
    with pytest.raises(UsageError, match=r"final_metrics.json is not JSON .*Fix: delete it and rerun"):
        sweeps.is_finished(str(tmp_path), point, 4)
    cut = '{"name": "abc", "flops": 1.0}\n{"name": "de'
    (tmp_path / "results.jsonl").write_text(cut)
    with pytest.raises(UsageError, match=r"results.jsonl:2 is not JSON"):
        sweeps.write_results(str(tmp_path), [{"name": "xyz", "flops": 2.0}])
    assert (tmp_path / "results.jsonl").read_text() == cut and not (tmp_path / "results.csv").exists()


def test_the_sweep_cli_checks_its_workdir_and_launcher_before_anything_runs(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("keep me")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no sbatch
    for flags, problem in (([f"--workdir={tmp_path}/afile/sweep"], "lies under"),
                           ([f"--workdir={tmp_path}/sweep", "--launcher=slurm"],
                            "--launcher=slurm submits with `sbatch`, which is not installed here")):
        result = run_cli("lm.sweep", SWEEP, *flags, check=False)
        assert result.returncode == 2 and result.stderr.startswith("lm: error: ") and problem in result.stderr
        assert result.stderr.count("\n") == 1 and "Fix:" in result.stderr, result.stderr
    assert os.listdir(tmp_path) == ["afile"]


WSD = f"--config={os.path.join(REPO, 'tests', 'data', 'tiny_wsd_sweep.py')}"


def test_wsd_branches_run_after_their_stable_run_locally_and_as_a_dependent_slurm_array(tmp_path):
    local = run_cli("lm.sweep", WSD, f"--workdir={tmp_path}", "--dry_run").stdout
    stable, *cooldowns = [line for line in local.splitlines() if " -m lm.main " in line]
    assert "--config.train.keep_steps=(8, 16)" in stable and "branch_from" not in stable
    assert len(cooldowns) == 2 and all(f"{tmp_path}/points/" in line for line in cooldowns)  # absolute for lm.main
    assert "--config.train.branch_step=8" in cooldowns[0] and "--config.train.branch_step=16" in cooldowns[1]
    slurm = run_cli("lm.sweep", WSD, f"--workdir={tmp_path}", "--dry_run", "--launcher=slurm").stdout
    first, then = [line for line in slurm.splitlines() if line.startswith("sbatch ")]
    assert "--array=0-0%1 --parsable " in first and first.endswith("slurm_points.txt")
    assert "--array=0-1%1 --dependency=afterok:FIRST_JOB_ID " in then
    assert then.endswith("slurm_branches.txt")

    early = run_cli("lm.sweep", f"{WSD}:inside_warmup", f"--workdir={tmp_path}", check=False)
    assert early.returncode == 2 and early.stderr.count("\n") == 1
    assert ("the token budget 128 (1 steps) would branch at step 1, inside the stable run's warmup "
            "(config.optim.warmup_steps=2)") in early.stderr


def test_the_wsd_recipe_refuses_a_step_unit_with_no_room_for_warmup_and_cooldown_naming_the_argument():
    from lm.config import validate
    from lm.scaling import branches

    recipe = os.path.join(REPO, "configs", "scaling", "shakespeare_wsd.py")
    for unit in (0, 9):
        with pytest.raises(sweeps.SweepError, match=f"the argument 'branches,{unit}' gives a step unit of {unit}, "
                                                    "below 10") as refused:
            sweeps.load(f"{recipe}:branches,{unit}")
        assert str(refused.value).count("Fix:") == 1, refused.value
    base, points = sweeps.load(f"{recipe}:branches,10")  # the least unit: every point is a valid run
    configs = {p.name: sweeps.apply(base, p) for p in points}
    for config in configs.values():
        validate(config)
    branches.check(points, configs)


def test_a_branch_of_no_point_or_of_a_step_its_parent_never_keeps_is_refused(tmp_path):
    from lm.scaling import branches

    base = sweeps.load(WSD.partition("=")[2])[0]
    for bad, problem in (({"train.branch_from": "points/nothere"}, "which is no point of the sweep"),
                         ({"train.branch_step": 12}, "branches at step 12 of sweep point 0"),
                         ({"model.d_model": 64}, r"differs from sweep point 0 .*, which it branches from, in fields "
                                                 r"a branch cannot change: config\.model\.d_model was 32, now 64")):
        overrides = [{"train.steps": 16, "train.keep_steps": (8,)},
                     {"train.steps": 20, "train.branch_from": "points/", "train.branch_step": 8}]
        overrides[1]["train.branch_from"] += sweeps.point_name(overrides[0])
        overrides[1].update(bad)
        points = sweeps.name_points(overrides, base)
        with pytest.raises(branches.BranchError, match=problem):
            branches.check(points, {p.name: sweeps.apply(base, p) for p in points})


@pytest.mark.slow
@pytest.mark.resume
def test_a_wsd_sweep_killed_with_a_branch_pending_resumes_and_writes_a_row_per_budget(tmp_path):
    runner = subprocess.Popen([sys.executable, "-m", "lm.sweep", WSD, f"--workdir={tmp_path}", "--parallel=2"],
                              cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in runner.stdout:  # the branches wait for the stable run's checkpoints at 8 and 16
        out.append(line)
        if "the stable run of its branches" in line:
            break
    runner.kill()  # -9, with the branch of budget 20 at most just started: it is pending
    runner.wait()
    assert any(line.startswith("finished ") for line in out), "".join(out)

    finished = run_cli("lm.sweep", WSD, f"--workdir={tmp_path}", "--parallel=2", timeout=300)
    assert re.search(r"3 points, [12] finished, [12] to run", finished.stdout), finished.stdout
    assert "results: 2 of 2 points" in finished.stdout and "1 stable run(s) counted in" in finished.stdout
    logs = "".join(open(os.path.join(d, "sweep.log"), encoding="utf-8").read() for d in _point_dirs(tmp_path))
    assert "branching from the checkpoint at step 8 in" in logs and "at step 16 in" in logs
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["tokens"]))
    per_step = 8 * 16
    assert [int(r["tokens"]) for r in rows] == [10 * per_step, 20 * per_step]  # each row: a run of its budget
    # The compute spent: the cooldown, and the stable steps since the previous branch point.
    assert [int(r["spent_tokens"]) for r in rows] == [(2 + 8) * per_step, (4 + 8) * per_step]
    for row in rows:
        assert float(row["spent_flops"]) / float(row["flops"]) == pytest.approx(
            int(row["spent_tokens"]) / int(row["tokens"]))
        assert len(row["parent"]) == 8 and float(row["val_loss"]) > 0
    assert "3 finished, 0 to run" in run_cli("lm.sweep", WSD, f"--workdir={tmp_path}").stdout
