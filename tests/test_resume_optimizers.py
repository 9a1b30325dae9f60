"""Every optimizer and every schedule trains, checkpoints and resumes exactly (issue 23,
acceptance 1): stopped after a checkpoint and rerun, a run repeats the same losses and
ends in the same state, bit for bit. Most cases stop in-process (the checkpoints after the
resume point are deleted, as if the run had died after it); one is a real kill -9 of
`python -m lm.main`."""

import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import cli_flags, run_cli, tiny_config
from test_end_to_end import CONFIG, read_metrics
from test_reliability import start_run, wait_for_new_checkpoint

from lm.config import choices
from lm.training import loop

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT = 6, 3  # a checkpoint at 3 (the resume point) and at the end
# Each schedule's fields put a change of course after the resume point (TINY warms up over 2 steps).
SCHEDULE_FIELDS = {
    "wsd": dict(optim__cooldown_fraction=0.5),  # the cooldown starts at the checkpoint
    "step": dict(optim__step_boundaries=(4, 5)),
    "cyclical": dict(optim__cycle_steps=2),  # triangular: trough at 3, back at lr at 4, ...
    "cosine_restarts": dict(optim__restart_steps=2, optim__restart_mult=2.0),  # restarts at 4
}


def optimizer_case(name: str):
    schedule = "constant" if name == "schedule_free_adamw" else "cosine"  # schedule-free refuses a decay
    return pytest.param(dict(optim__name=name, optim__schedule=schedule,
                             optim__lr=1e-2 if name in ("sgd", "adafactor") else 1e-3), id=f"{name}-{schedule}")


def schedule_case(kind: str):
    return pytest.param(dict(optim__schedule=kind, **SCHEDULE_FIELDS.get(kind, {})), id=f"adamw-{kind}")


# Every optimizer under its usual schedule (today's default, adamw + cosine, once), and every
# schedule not already run under adamw; each case compiles its own step, so none twice.
CASES = ([optimizer_case(name) for name in choices.OPTIMIZERS]
         + [schedule_case(kind) for kind in choices.SCHEDULES if kind not in ("cosine", "constant")])


def test_the_cases_cover_every_optimizer_and_every_schedule_once():
    covered = [case.values[0] for case in CASES]
    assert {c.get("optim__name", "adamw") for c in covered} == set(choices.OPTIMIZERS)
    assert {c["optim__schedule"] for c in covered} == set(choices.SCHEDULES)
    assert len(covered) == len(choices.OPTIMIZERS) + len(choices.SCHEDULES) - 2  # cosine and constant above


def logged(workdir) -> list[tuple[int, float, float]]:
    """(step, train loss, learning rate) of each train record, in the order logged."""
    return [(r["step"], r["train/loss"], r["train/lr"]) for r in read_metrics(workdir) if "train/loss" in r]


def stored_state(workdir, step: int) -> list[np.ndarray]:
    """Every array of the train state checkpointed at `step`: parameters, optimizer state, step."""
    restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


@pytest.mark.parametrize("overrides", CASES)
def test_a_run_stopped_after_a_checkpoint_and_rerun_repeats_its_losses_and_state_bit_for_bit(overrides, tmp_path):
    config = tiny_config(train__steps=STEPS, train__log_every=1, train__checkpoint_every=CHECKPOINT,
                         eval__num_batches=1, sample__max_new_tokens=1, **overrides)
    first = loop.train_and_evaluate(config, str(tmp_path))
    want = stored_state(tmp_path, STEPS)
    shutil.rmtree(tmp_path / "checkpoints" / str(STEPS))  # as if it had died after the checkpoint at 3
    second = loop.train_and_evaluate(config, str(tmp_path))

    records = logged(tmp_path)
    steps_after = list(range(CHECKPOINT + 1, STEPS + 1))
    assert [r[0] for r in records] == list(range(1, STEPS + 1)) + steps_after  # the rerun resumed at 3
    assert len({loss for _, loss, _ in records}) == STEPS  # it trained: no two steps' losses alike
    assert records[CHECKPOINT:STEPS] == records[STEPS:]  # the same losses and rates, bit for bit
    assert second == first  # the same final validation metrics
    for got, expected in zip(stored_state(tmp_path, STEPS), want, strict=True):
        np.testing.assert_array_equal(got, expected)


def wait_for_logged_step(process, workdir, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s, _, _ in logged(workdir)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"step {step} not logged in {timeout} s"
        time.sleep(0.02)


def test_a_muon_wsd_run_killed_with_sigkill_and_rerun_ends_bitwise_like_an_uninterrupted_one(tmp_path):
    """A real kill -9 of the CLI a few steps after a checkpoint, in WSD's stable phase; the
    rerun resumes there and goes through the cooldown."""
    steps, every = 150, 50  # the kill must land before the end: 100 steps after the first checkpoint
    flags = cli_flags(optim__name="muon", optim__schedule="wsd", optim__cooldown_fraction=0.5, optim__lr=1e-2,
                      train__steps=steps, train__log_every=1, train__checkpoint_every=every, eval__num_batches=1,
                      sample__max_new_tokens=1)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    expected = run_cli("lm.main", CONFIG, f"--workdir={whole}", *flags)

    process = start_run(killed, *flags)
    wait_for_new_checkpoint(process, killed / "checkpoints")
    wait_for_logged_step(process, killed, every + 2)  # steps past the checkpoint, lost with the kill
    process.kill()  # SIGKILL
    process.communicate()
    assert process.returncode == -9
    saved = max(int(n) for n in os.listdir(killed / "checkpoints") if n.isdigit())
    stopped = max(s for s, _, _ in logged(killed))
    assert saved == every and saved < stopped < steps, (saved, stopped)  # killed mid-run, in the stable phase
    finished = run_cli("lm.main", CONFIG, f"--workdir={killed}", *flags)

    assert f"resuming from the checkpoint at step {saved}" in finished.stdout
    final_line = lambda out: [line for line in out.splitlines() if line.startswith("final validation loss")][0]
    assert final_line(finished.stdout) == final_line(expected.stdout)
    want = {step: (loss, lr) for step, loss, lr in logged(whole)}
    got = {step: (loss, lr) for step, loss, lr in logged(killed)}  # the rerun's records come last and win
    assert sorted(want) == list(range(1, steps + 1))
    assert [got[s] for s in range(saved + 1, steps + 1)] == [want[s] for s in range(saved + 1, steps + 1)]
    for got_array, want_array in zip(stored_state(killed, steps), stored_state(whole, steps), strict=True):
        np.testing.assert_array_equal(got_array, want_array)
