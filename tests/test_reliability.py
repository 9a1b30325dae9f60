"""Reliability: preemption, divergence, damaged checkpoints, one run per workdir, and
restoring onto a different mesh."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import REPO, cli_env, cli_flags, run_cli, tiny_config
from test_end_to_end import CONFIG, read_metrics
from test_train import STREAM

from lm.data import batches, rows, tokenizers
from lm.errors import PREEMPTED
from lm.model import ModelConfig
from lm.parallel import sharding
from lm.runs import checkpoint
from lm.runs.workdir import WorkdirLock
from lm.training import loop, setup
from lm.training.stopping import RunStopped, StopSignals, interruptible
from lm.training.trainer import make_trainer

pytestmark = pytest.mark.slow


def start_run(workdir, *flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lm.main", CONFIG, f"--workdir={workdir}", *flags], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(process: subprocess.Popen, workdir, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    reached = lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and any(
        r.get("step", 0) >= step for r in read_metrics(workdir))
    while not reached():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.1)


def wait_for_new_steps(process: subprocess.Popen, workdir, count: int, timeout: float = 120) -> None:
    """Waits until the run has logged `count` steps beyond those in metrics.jsonl now."""
    path, deadline = os.path.join(workdir, "metrics.jsonl"), time.monotonic() + timeout
    before = len(read_metrics(workdir)) if os.path.exists(path) else 0
    while count and (not os.path.exists(path) or
                     sum("train/loss" in r for r in read_metrics(workdir)[before:]) < count):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{count} steps not logged in {timeout} s"
        time.sleep(0.05)


def finished_checkpoints(checkpoints) -> set[str]:
    return {n for n in os.listdir(checkpoints) if n.isdigit()} if os.path.isdir(checkpoints) else set()


def wait_for_new_checkpoint(process: subprocess.Popen, checkpoints, timeout: float = 120) -> None:
    before, deadline = finished_checkpoints(checkpoints), time.monotonic() + timeout
    while finished_checkpoints(checkpoints) <= before:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no new checkpoint in {timeout} s"
        time.sleep(0.01)


def save_in_progress(checkpoints) -> list[str]:
    """Orbax's temporary directories: saves begun and not yet renamed into place."""
    return [n for n in os.listdir(checkpoints) if "tmp" in n] if os.path.isdir(checkpoints) else []


def kill_mid_save(process: subprocess.Popen, checkpoints) -> bool:
    """SIGKILLs the run as soon as a save is under way; True if the kill left it unfinished."""
    while not save_in_progress(checkpoints):
        assert process.poll() is None, "the run ended before a save could be interrupted"
        time.sleep(0.002)
    process.kill()
    process.wait()
    return bool(save_in_progress(checkpoints))


def last_loss_per_step(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def final_params(workdir, step: int) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def test_a_run_killed_at_random_steps_and_mid_save_ends_bitwise_like_an_uninterrupted_one(tmp_path):
    flags = cli_flags(train__steps=40, train__log_every=1, train__eval_every=20, train__checkpoint_every=5,
                      train__keep_checkpoints=2, train__permanent_checkpoint_every=20)
    expected = run_cli("lm.main", CONFIG, f"--workdir={tmp_path / 'whole'}", *flags)
    # Two tiers: the 2 newest frequent checkpoints, and every 20th step kept for good.
    assert sorted(map(int, os.listdir(tmp_path / "whole" / "checkpoints"))) == [20, 35, 40]

    workdir, seed = tmp_path / "killed", random.randrange(1 << 30)
    checkpoints, rng = workdir / "checkpoints", random.Random(seed)
    for kill in ("at a step", "mid-save", "at a step", "mid-save"):
        process = start_run(workdir, *flags)
        if kill == "at a step":  # after one more finished checkpoint, so the run makes progress
            wait_for_new_checkpoint(process, checkpoints)
            wait_for_new_steps(process, workdir, rng.randint(0, 4))
            process.kill()
            process.wait()
        else:
            assert kill_mid_save(process, checkpoints), f"a save finished before the kill (seed {seed})"
    finished = run_cli("lm.main", CONFIG, f"--workdir={workdir}", *flags)

    assert "resuming from the checkpoint at step" in finished.stdout
    assert not save_in_progress(checkpoints)  # interrupted saves were cleaned up, never restored
    final_line = lambda out: [line for line in out.splitlines() if line.startswith("final validation loss")][0]
    assert final_line(finished.stdout) == final_line(expected.stdout)
    assert last_loss_per_step(workdir) == last_loss_per_step(tmp_path / "whole"), f"seed {seed}"
    for got, want in zip(final_params(workdir, 40), final_params(tmp_path / "whole", 40), strict=True):
        assert np.array_equal(got, want), f"seed {seed}"


def test_sigterm_checkpoints_at_the_next_step_and_exits_75_and_the_rerun_resumes_there(tmp_path):
    flags = cli_flags(train__steps=5000, train__log_every=1, train__checkpoint_every=0, optim__warmup_steps=2)
    process = start_run(tmp_path, *flags)
    wait_for_step(process, tmp_path, 5)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr
    assert time.monotonic() - sent < 15
    stopped_at = int(stderr.split("at step ")[1].split(";")[0])
    assert f"the checkpoint of step {stopped_at} is saved" in stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(stopped_at)]
    resumed = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}",
                      *cli_flags(train__steps=stopped_at + 2, train__log_every=1, optim__warmup_steps=2))
    assert f"resuming from the checkpoint at step {stopped_at}" in resumed.stdout
    assert sorted(last_loss_per_step(tmp_path)) == list(range(1, stopped_at + 3))  # the stop's own step is logged
    # Each attempt's goodput is kept; the run's counts the stopped one and the time between.
    attempts = [json.loads(line) for line in (tmp_path / "goodput.jsonl").read_text().splitlines()]
    assert [a["ended"] for a in attempts] == ["stopped", "finished"]
    assert attempts[0]["steps"] == stopped_at and attempts[1]["steps"] == 2
    over = json.loads((tmp_path / "final_metrics.json").read_text())["goodput_over_attempts"]
    assert over["attempts"] == 2
    assert over["training_seconds"] == pytest.approx(sum(a["seconds"]["training_steps"] for a in attempts))
    assert over["span_seconds"] >= sum(a["wall_seconds"] for a in attempts) - 1e-6


def test_sigterm_during_start_up_exits_75_at_once_saving_nothing_and_the_rerun_trains(tmp_path):
    # config.json is written during set-up; the init, the eval step's and the first step's
    # compiles follow, so the signal lands before any step (SLURM's TERM@120 during a long
    # start-up: the default handler's status 143 would not have requeued the job).
    flags = cli_flags(train__steps=6, train__checkpoint_every=3)
    process = start_run(tmp_path, *flags)
    while not (tmp_path / "config.json").exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr
    assert time.monotonic() - sent < 60  # the compile under way ends first
    assert "\nlm: stopped by SIGTERM during start-up, before the first step" in stderr  # not "lm: error:"
    assert "Traceback" not in stderr and "lm: error" not in stderr
    assert finished_checkpoints(tmp_path / "checkpoints") == set()
    resumed = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *flags)
    assert "final validation loss" in resumed.stdout
    assert max(map(int, finished_checkpoints(tmp_path / "checkpoints"))) == 6


def after_a_signal(function, sig=signal.SIGTERM):
    """`function`, run once this process has received `sig`: as a preemption during it (the
    handler runs before the call; lm's only notes the signal there, so `function` runs on)."""
    def signalled(*args):
        os.kill(os.getpid(), sig)
        return function(*args)
    return signalled


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_a_resumed_run_restores_stops_it_after_the_restore_saving_nothing(tmp_path, monkeypatch, sig):
    loop.train_and_evaluate(tiny_config(train__steps=4), str(tmp_path))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(loop, "restore_or_init", after_a_signal(loop.restore_or_init, sig))
    with pytest.raises(RunStopped, match=f"stopped by {sig.name} during start-up") as stopped:
        loop.train_and_evaluate(tiny_config(train__steps=6), str(tmp_path))
    assert stopped.value.exit_code == PREEMPTED
    assert finished_checkpoints(tmp_path / "checkpoints") == {"4"}
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the process's own handlers are back
    monkeypatch.undo()
    loop.train_and_evaluate(tiny_config(train__steps=6), str(tmp_path))
    assert max(map(int, finished_checkpoints(tmp_path / "checkpoints"))) == 6


def test_a_signal_during_the_corpus_build_stops_the_build_at_once(tmp_path, monkeypatch):
    def endless_build(*args):  # a build of hours, in one blocking call
        threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGTERM)).start()
        time.sleep(600)  # the signal interrupts it, and the handler's exception ends it

    monkeypatch.setattr(setup, "prepare_corpus", endless_build)
    began = time.monotonic()
    with pytest.raises(RunStopped, match="stopped by SIGTERM during start-up") as stopped:
        loop.train_and_evaluate(tiny_config(), str(tmp_path))
    assert stopped.value.exit_code == PREEMPTED and time.monotonic() - began < 60


def test_a_signal_during_the_last_save_stops_with_75_and_one_during_the_final_evaluation_lets_the_run_end(
        tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_save", after_a_signal(loop._save))  # tiny_config saves only the last step
    with pytest.raises(RunStopped, match="stopped by SIGTERM at step 6; the checkpoint of step 6 is saved") as e:
        loop.train_and_evaluate(tiny_config(), str(tmp_path / "save"))
    assert e.value.exit_code == PREEMPTED and finished_checkpoints(tmp_path / "save" / "checkpoints") == {"6"}
    assert not (tmp_path / "save" / "final_metrics.json").exists()  # the evaluation is the rerun's
    monkeypatch.undo()
    assert loop.train_and_evaluate(tiny_config(), str(tmp_path / "save"))["loss"] > 0
    assert (tmp_path / "save" / "final_metrics.json").exists()

    monkeypatch.setattr(loop, "_log_eval", after_a_signal(loop._log_eval))  # what is left after it is short
    assert loop.train_and_evaluate(tiny_config(), str(tmp_path / "evaluation"))["loss"] > 0
    assert (tmp_path / "evaluation" / "final_metrics.json").exists()


def test_a_signal_while_sentencepiece_reads_the_corpus_is_a_stop_not_a_corpus_error():
    # SentencePiece turns an exception raised in its input iterator into a RuntimeError, which
    # lm reports as a corpus error (exit 2, not requeued): it must still be the stop.
    def documents():
        for i in range(100_000):
            if i == 50:
                os.kill(os.getpid(), signal.SIGTERM)
            yield f"document {i} " * 20

    with pytest.raises(RunStopped, match="stopped by SIGTERM during start-up") as stopped:
        with StopSignals(), interruptible():
            tokenizers.train_sentencepiece(documents(), vocab_size=300)
    assert stopped.value.exit_code == PREEMPTED


def finite_params(step_dir) -> bool:
    restored = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_a_diverging_run_stops_with_status_3_and_leaves_only_finite_checkpoints(tmp_path):
    result = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(
        train__steps=20, train__log_every=1, train__checkpoint_every=1, optim__lr=1e30), check=False)
    assert result.returncode == 3, result.stderr
    assert "training diverged" in result.stderr and "config.train.max_nonfinite_steps=0" in result.stderr
    steps = [name for name in os.listdir(tmp_path / "checkpoints") if name.isdigit()]  # finished saves
    assert steps and all(finite_params(tmp_path / "checkpoints" / s) for s in steps)
    assert max(map(int, steps)) < 20


def test_a_run_allowed_to_skip_non_finite_steps_skips_them_and_finishes(tmp_path):
    result = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(
        train__steps=6, train__log_every=1, optim__lr=1e30, train__max_nonfinite_steps=10))
    skipped = [r["train/nonfinite_steps"] for r in read_metrics(tmp_path) if "train/nonfinite_steps" in r]
    assert skipped[-1] >= 3 and skipped == sorted(skipped)  # the count only grows
    assert finite_params(tmp_path / "checkpoints" / "6")
    assert result.returncode == 0


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_for_the_one_before(tmp_path):
    run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(train__steps=6, train__checkpoint_every=2))
    for root, _, files in os.walk(tmp_path / "checkpoints" / "6" / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(0)
    resumed = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(train__steps=8))
    assert "checkpoint at step 6" in resumed.stderr and "does not restore" in resumed.stderr
    assert "resuming from the checkpoint at step 4" in resumed.stdout


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path):
    first = start_run(tmp_path, *cli_flags(train__steps=5000, train__log_every=1, train__checkpoint_every=0))
    try:
        wait_for_step(first, tmp_path, 1)
        second = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(), check=False)
        assert second.returncode == 2
        assert f"the workdir {tmp_path} is in use by a running run (pid {first.pid} on" in second.stderr
    finally:
        first.kill()
        first.wait()
    WorkdirLock(str(tmp_path)).acquire().release()  # a run killed with -9 leaves no stale lock


def test_a_data_parallel_checkpoint_restores_onto_fsdp_x_tensor_and_takes_the_same_next_step(tmp_path):
    def trainer_on(mesh_shape):
        config = tiny_config(train__batch_size=16, model__num_heads=4)
        config.mesh.shape.update(mesh_shape)
        mesh = sharding.make_mesh(config, jax.devices())
        return make_trainer(config, ModelConfig.from_config(config.model, 64, 16), mesh, pad_id=0)

    data = batches.per_process(rows.train_rows(STREAM, 16, seed=0), 16)
    dp = trainer_on(dict(data=8, fsdp=1, tensor=1))
    state = dp.init()
    for step in range(2):
        state, _ = dp.step(state, batches.to_global(data[step], dp.batch_sharding))
    saver = checkpoint.Checkpointer(str(tmp_path), keep=1)
    saver.save(2, state, batches.iterate(data, 0, 0), {"step": 2})
    saver.wait()
    _, expected = dp.step(state, batches.to_global(data[2], dp.batch_sharding))

    fsdp_tp = trainer_on(dict(data=1, fsdp=4, tensor=2))
    restored = checkpoint.Checkpointer(str(tmp_path), keep=1).restore_state(2, fsdp_tp.abstract_state())
    kernel = restored.params["layer_0"]["mlp"]["wi"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (8, 64)  # embed over fsdp=4, mlp over tensor=2
    _, metrics = fsdp_tp.step(restored, batches.to_global(data[2], fsdp_tp.batch_sharding))
    np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("before", ["", '{"step": 1, "train/loss": 3.0}\n'])
def test_a_metrics_line_torn_by_a_kill_is_dropped_so_the_rerun_appends_whole_records(tmp_path, before):
    """kill -9 mid-write can leave a last line without its newline; the rerun's first record
    must not be glued onto it (both would be lost to every reader)."""
    from lm.training.logs import MetricWriter

    (tmp_path / "metrics.jsonl").write_text(before + '{"step": 2, "train/lo')
    writer = MetricWriter(str(tmp_path))
    writer.write(2, "train", {"loss": 2.5})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(x) for x in before.splitlines()] + [
        {"step": 2, "train/loss": 2.5}]
