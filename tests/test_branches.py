"""Branching a run from another run's checkpoint (`train.branch_from`, `train.branch_step`),
and the permanent checkpoints it branches from (`train.keep_steps`)."""

import os

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli_flags, run_cli
from test_end_to_end import CONFIG, read_metrics
from test_reliability import final_params

from lm.config import ConfigError, validate
from lm.runs import checkpoint
from tests.helpers import tiny_config

# The parent is the whole run's schedule stopped early: here the schedule of 20 steps (a
# decay length of 20) with a constant rate from the warmup's end to step 16, then a cooldown.
SCHEDULE = dict(optim__schedule="wsd", optim__cooldown_fraction=0.2, optim__decay_steps=20, train__log_every=1)


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.mark.slow
def test_a_wsd_branch_of_a_stable_run_equals_the_uninterrupted_wsd_run(tmp_path):
    whole = run_cli("lm.main", CONFIG, f"--workdir={tmp_path / 'whole'}", *cli_flags(train__steps=20, **SCHEDULE))
    # The stable run: 18 steps at most, keeping 8 and 16 for good beside the newest frequent one.
    stable = tmp_path / "stable"
    run_cli("lm.main", CONFIG, f"--workdir={stable}", *cli_flags(
        train__steps=18, train__checkpoint_every=3, train__keep_checkpoints=1, train__keep_steps=(8, 16), **SCHEDULE))
    assert sorted(checkpoint.finished_steps(str(stable / "checkpoints"))) == [8, 16, 18]

    branch = tmp_path / "branch"
    flags = cli_flags(train__steps=20, train__branch_from=str(stable), train__branch_step=16, **SCHEDULE)
    branched = run_cli("lm.main", CONFIG, f"--workdir={branch}", *flags)
    assert f"branching from the checkpoint at step 16 in {stable / 'checkpoints'}" in branched.stdout
    final = lambda out: [line for line in out.splitlines() if line.startswith("final validation loss")][0]
    assert final(branched.stdout) == final(whole.stdout)
    got, want = losses(branch), losses(tmp_path / "whole")
    assert sorted(got) == list(range(17, 21))  # the branch trains only its own steps
    assert got == {step: want[step] for step in got}  # the same batches and updates, bit for bit
    for a, b in zip(final_params(branch, 20), final_params(tmp_path / "whole", 20), strict=True):
        assert np.array_equal(a, b)

    missing = run_cli("lm.main", CONFIG, f"--workdir={tmp_path / 'other'}", *cli_flags(
        train__steps=20, train__branch_from=str(stable), train__branch_step=12, **SCHEDULE), check=False)
    assert missing.returncode == 2
    assert (f"config.train.branch_from='{stable}' has no checkpoint at config.train.branch_step=12 "
            "(its checkpoints: 8, 16, 18)") in missing.stderr
    assert "Fix: branch from a step that run keeps, or train it with 12 in its config.train.keep_steps" \
        in missing.stderr
    assert not os.path.exists(tmp_path / "other")  # a refused branch leaves no workdir behind
    other_model = run_cli("lm.main", CONFIG, f"--workdir={tmp_path / 'wide'}", *cli_flags(
        train__steps=20, train__branch_from=str(stable), train__branch_step=16, model__d_model=64, **SCHEDULE),
        check=False)
    assert other_model.returncode == 2 and "config.model.d_model was 32, now 64" in other_model.stderr


def test_keep_steps_and_branch_fields_are_checked_with_one_message_naming_the_field():
    with pytest.raises(ConfigError, match=r"config.train.keep_steps=\(0, 30\) must hold steps from 1 to "
                                          r"train.steps=20"):
        validate(tiny_config(train__steps=20, train__keep_steps=(0, 30)))
    with pytest.raises(ConfigError, match=r"config.train.branch_step=20 must be a step from 1 to train.steps-1=19 "
                                          r"when train.branch_from is set \('/x'\)"):
        validate(tiny_config(train__steps=20, train__branch_from="/x", train__branch_step=20))
    with pytest.raises(ConfigError, match="config.train.branch_step=4 is set but train.branch_from is not"):
        validate(tiny_config(train__steps=20, train__branch_step=4))
    validate(tiny_config(train__steps=20, train__keep_steps=(4, 20), train__branch_from="/x", train__branch_step=4))


def test_a_branch_from_a_missing_directory_or_one_that_is_no_run_says_so_before_any_step(tmp_path):
    from lm.errors import UsageError
    from lm.training.setup import check_branch

    (tmp_path / "notes").mkdir()
    for parent, problem in (("nonexistent", "does not exist"), ("notes", "is not a run's workdir: it has no "
                                                                         "checkpoints/")):
        config = tiny_config(train__steps=40, train__branch_from=str(tmp_path / parent), train__branch_step=20)
        with pytest.raises(UsageError, match=f"config.train.branch_from='{tmp_path / parent}' {problem}. Fix: "):
            check_branch(config, {})
    assert not os.path.exists(tmp_path / "nonexistent") and os.listdir(tmp_path / "notes") == []


def test_orbax_keeps_the_keep_steps_beside_the_newest_checkpoints(tmp_path):
    keeper = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_steps=(3, 5), asynchronous=False)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    try:
        for step in range(1, 10):
            next(data)
            keeper.save(step, {"w": jnp.full((2,), step, jnp.float32)}, data, {"step": step})
    finally:
        keeper.close()
    assert checkpoint.finished_steps(str(tmp_path)) == [3, 5, 8, 9]
