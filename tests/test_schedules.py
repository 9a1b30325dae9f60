"""Learning-rate schedules (lm.training.schedules): values at their key steps against
closed forms, their shapes, the config's errors (exact resume under each: tests/test_resume_optimizers.py)."""

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, cli_env, tiny_config

from lm import config as config_lib
from lm.config import schedule_fields
from lm.training import optim, schedules, setup

LR, FINAL, WARMUP, TOTAL = 1e-3, 1e-4, 100, 1000


def rates(kind, total=TOTAL, warmup=WARMUP, **options) -> np.ndarray:
    """The schedule at steps 0..total + 10 (past the end too), evaluated under jit."""
    schedule = schedules.build(kind, LR, warmup, total, FINAL, **options)
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total + 11)), np.float64)


def falls(values) -> bool:
    return bool(np.all(np.diff(values) <= 1e-9))


def rises(values) -> bool:
    return bool(np.all(np.diff(values) >= -1e-9))


# --- values at the key steps, against closed forms ---

@pytest.mark.parametrize("shape, at_half", [
    ("linear", (LR + FINAL) / 2), ("cosine", (LR + FINAL) / 2), ("1-sqrt", FINAL + (LR - FINAL) * (1 - 0.5 ** 0.5))])
def test_wsd_warms_up_holds_lr_then_cools_down_over_the_last_fraction(shape, at_half):
    r = rates("wsd", cooldown_fraction=0.2, cooldown_shape=shape)
    start = schedules.cooldown_start(TOTAL, 0.2)
    assert start == 800
    assert r[0] == 0 and r[50] == pytest.approx(LR / 2) and r[WARMUP] == pytest.approx(LR)
    assert np.all(r[WARMUP:start] == np.float32(LR)) and r[start] == pytest.approx(LR)  # the cooldown's first step
    assert r[900] == pytest.approx(at_half, rel=1e-5)  # halfway through the cooldown
    assert r[TOTAL] == pytest.approx(FINAL) and np.all(r[TOTAL:] == r[TOTAL])
    assert rises(r[:WARMUP + 1]) and falls(r[WARMUP:]) and r[start + 1] < LR


def test_the_1_sqrt_cooldown_is_hagele_et_al_s_formula():
    r = rates("wsd", cooldown_fraction=0.2, cooldown_shape="1-sqrt")
    for t in (801, 850, 937, 999):
        assert r[t] == pytest.approx(FINAL + (LR - FINAL) * (1 - math.sqrt((t - 800) / 200)), rel=1e-5)


def test_a_wsd_run_is_a_stable_run_branched_at_its_cooldown_start():
    """Runs of 1x, 2x and 4x 500 steps share their stable phase: each equals the longest
    run (and a constant-rate run) until its own cooldown starts, at 80% of its length."""
    longest = rates("wsd", total=2000, cooldown_fraction=0.2, cooldown_shape="1-sqrt")
    stable = rates("constant", total=2000)  # the stable run itself may be a constant-rate run
    np.testing.assert_array_equal(stable[:1600], longest[:1600])
    for total in (500, 1000):
        r = rates("wsd", total=total, cooldown_fraction=0.2, cooldown_shape="1-sqrt")
        start = schedules.cooldown_start(total, 0.2)
        assert start == total * 4 // 5
        np.testing.assert_array_equal(r[:start], longest[:start])  # the steps a branch inherits
        assert r[start] == longest[start] == np.float32(LR) and r[start + 1] < longest[start + 1]


def test_cooldown_start_rounds_half_up():
    assert [schedules.cooldown_start(t, 0.25) for t in (10, 14, 1000)] == [8, 11, 750]  # 7.5 -> 8, 10.5 -> 11


def test_step_decay_multiplies_by_gamma_at_each_boundary():
    r = rates("step", step_boundaries=(500, 800), step_gamma=0.1)
    assert r[WARMUP] == pytest.approx(LR) and np.all(r[WARMUP:500] == np.float32(LR))
    assert r[500] == pytest.approx(LR * 0.1) and r[799] == pytest.approx(LR * 0.1)
    assert r[800] == pytest.approx(LR * 0.01) and r[-1] == pytest.approx(LR * 0.01)
    assert falls(r[WARMUP:])


def test_triangular_cycles_between_lr_and_final_lr_from_the_warmups_end():
    r = rates("cyclical", cycle_mode="triangular", cycle_steps=200)
    for cycle_start in (100, 300, 500, 700, 900):
        assert r[cycle_start] == pytest.approx(LR)
        assert r[cycle_start + 50] == pytest.approx((LR + FINAL) / 2)
        assert r[cycle_start + 100] == pytest.approx(FINAL)
        assert falls(r[cycle_start:cycle_start + 101]) and rises(r[cycle_start + 100:cycle_start + 201])
    np.testing.assert_allclose(np.diff(r[100:200]), -(LR - FINAL) / 100, rtol=1e-3)  # straight lines


def test_one_cycle_rises_over_the_warmup_and_falls_to_final_lr():
    r = rates("cyclical", cycle_mode="one_cycle", cycle_steps=200)
    assert r[0] == pytest.approx(LR / 25) and r[WARMUP] == pytest.approx(LR) and r[TOTAL] == pytest.approx(FINAL)
    assert r[WARMUP // 2] == pytest.approx((LR / 25 + LR) / 2)  # cosine rise, halfway
    assert r[550] == pytest.approx((LR + FINAL) / 2, rel=1e-4)  # cosine fall, halfway
    assert rises(r[:WARMUP + 1]) and falls(r[WARMUP:])


def test_cosine_restarts_restart_at_lr_with_periods_growing_by_the_multiplier():
    r = rates("cosine_restarts", restart_steps=100, restart_mult=2.0)
    assert schedules.restart_periods(TOTAL - WARMUP, 100, 2.0) == [100, 200, 400, 800]
    period_cos = lambda t, period: FINAL + (LR - FINAL) * (1 + math.cos(math.pi * t / period)) / 2
    for start, period in ((100, 100), (200, 200), (400, 400), (800, 800)):  # the last one outlasts the run
        assert r[start] == pytest.approx(LR)  # a restart
        end = min(start + period, len(r))
        if start + period // 2 < end:
            assert r[start + period // 2] == pytest.approx((LR + FINAL) / 2, rel=1e-4)
        assert falls(r[start:end])
        assert r[end - 1] == pytest.approx(period_cos(end - 1 - start, period), rel=1e-4)


def test_restart_periods_with_a_multiplier_of_one_are_equal():
    assert schedules.restart_periods(1000, 300, 1.0) == [300, 300, 300, 300]
    assert schedules.restart_periods(1000, 300, 1.5) == [300, 450, 675]


def test_the_config_builds_the_same_schedule_as_its_fields():
    c = tiny_config(train__steps=1000, optim__warmup_steps=100, optim__schedule="wsd", optim__cooldown_fraction=0.3,
                    optim__cooldown_shape="linear")
    from_config = optim.schedule(c.optim, c.train.steps)
    assert float(from_config(700)) == pytest.approx(LR) and float(from_config(850)) == pytest.approx((LR + FINAL) / 2)
    c.optim.decay_steps = 500  # the decay length, not train.steps, is the run the schedule spans
    assert float(optim.schedule(c.optim, c.train.steps)(500)) == pytest.approx(FINAL)


def test_an_unknown_kind_is_a_value_error_naming_the_kinds():
    with pytest.raises(ValueError, match="unknown schedule 'wsd2'.*'cosine_restarts'"):
        schedules.build("wsd2", LR, WARMUP, TOTAL, FINAL)


# --- bad input: one message naming the field, its value and what is allowed ---

@pytest.mark.parametrize("overrides, message", [
    (dict(optim__schedule="warmup_stable_decay"), r"schedule='warmup_stable_decay' is not a known choice.*"
                                                  r"'wsd', 'step', 'cyclical', 'cosine_restarts'"),
    (dict(optim__schedule="wsd", optim__cooldown_fraction=1.0), r"cooldown_fraction=1\.0 must lie in \(0, 1\)"),
    (dict(optim__schedule="wsd", optim__cooldown_fraction=0.0), r"cooldown_fraction=0\.0 must lie in \(0, 1\)"),
    (dict(optim__schedule="wsd", optim__cooldown_fraction=0.005), r"cooldown_fraction=0\.005 leaves 0 cooldown step"),
    (dict(optim__schedule="wsd", optim__cooldown_shape="sqrt"), r"cooldown_shape='sqrt' is not a known choice.*"
                                                                 r"'linear', 'cosine', '1-sqrt'"),
    (dict(optim__schedule="wsd", optim__warmup_steps=50), r"warmup_steps=50 runs past the cooldown's start \(step 48"),
    (dict(optim__schedule="step", optim__step_boundaries=(20, 60)), r"step_boundaries=\(20, 60\) must be increasing "
                                                                    r"steps .*2 < b1 < b2 < \.\.\. < 60"),
    (dict(optim__schedule="step", optim__step_boundaries=(40, 30)), r"step_boundaries=\(40, 30\) must be increasing"),
    (dict(optim__schedule="step", optim__step_boundaries=(2, 30)), r"step_boundaries=\(2, 30\) must be increasing"),
    (dict(optim__schedule="step"), r"step_boundaries=\(\) must be increasing.*e\.g\. \(30, 45\)"),
    (dict(optim__schedule="step", optim__warmup_steps=40), r"step_boundaries=\(\) .*40 < b1.*e\.g\. \(50, 55\)"),
    (dict(optim__schedule="step", optim__step_boundaries=(30,), optim__step_gamma=0.0), r"step_gamma=0\.0 must lie "
                                                                                         r"in \(0, 1\]"),
    (dict(optim__schedule="step", optim__step_boundaries=(30,), optim__step_gamma=10.0), r"step_gamma=10\.0 must lie "
                                                                                          r"in \(0, 1\].*rise past"),
    (dict(optim__schedule="cyclical", optim__cycle_mode="exp_range"), r"cycle_mode='exp_range' is not a known choice"
                                                                      r".*'triangular', 'one_cycle'"),
    (dict(optim__schedule="cyclical", optim__cycle_steps=0), r"cycle_steps=0 must be a positive number of steps"),
    (dict(optim__schedule="cosine_restarts", optim__restart_steps=-5), r"restart_steps=-5 must be a positive"),
    (dict(optim__schedule="cosine_restarts", optim__restart_mult=0.5), r"restart_mult=0\.5 must be >= 1"),
    (dict(optim__schedule="cosine_restarts", optim__restart_steps=1, optim__restart_mult=1.0, train__steps=5000),
     r"restart_steps=1 gives more than 1000 restart periods"),
    (dict(optim__schedule="cosine_restarts", optim__warmup_steps=60), r"warmup_steps=60 leaves no room to decay"),
    (dict(optim__schedule="constant", optim__warmup_steps=61), r"warmup_steps=61 leaves no room at the constant "
                                                               r"rate in the decay length \(60 steps\)"),
    (dict(optim__lr=5e-5), r"final_lr=0\.0001 is above optim\.lr=5e-05: schedule 'cosine' goes from lr down.*"
                           r"Fix: set optim\.final_lr <= optim\.lr, e\.g\. 5e-06"),
    (dict(optim__schedule="wsd", optim__final_lr=0.01), r"final_lr=0\.01 is above optim\.lr=0\.001"),
])
def test_bad_schedule_fields_are_named_with_what_is_allowed(overrides, message):
    config = tiny_config(**{"train__steps": 60, **overrides})
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\." + message):
        config_lib.validate(config)


@pytest.mark.parametrize("steps", [7, 40, 60, 999, 3000])
def test_a_cooldown_too_short_to_lower_the_rate_is_refused_and_the_fraction_suggested_is_accepted(steps):
    one_step = tiny_config(train__steps=steps, optim__warmup_steps=0, optim__schedule="wsd",
                           optim__cooldown_fraction=1.2 / steps)  # rounds to a 1-step cooldown, at the peak
    with pytest.raises(config_lib.ConfigError, match=r"leaves 1 cooldown step\(s\).*first update is at the peak") as e:
        config_lib.validate(one_step)
    suggested = float(re.search(r"use a fraction >= ([0-9.e-]+)", str(e.value)).group(1))
    config_lib.validate(tiny_config(train__steps=steps, optim__warmup_steps=0, optim__schedule="wsd",
                                    optim__cooldown_fraction=suggested))
    lrs = rates("wsd", total=steps, warmup=0, cooldown_fraction=suggested, cooldown_shape="linear")
    assert lrs[steps - 1] < LR  # the last update (count steps - 1) is below the peak


def test_a_cycle_or_restart_period_longer_than_the_run_is_warned_about_when_the_run_is_set_up(tmp_path, caplog):
    doubts = lambda **o: schedule_fields.doubts(tiny_config(train__steps=60, **o).optim, 60)
    assert doubts(optim__schedule="cyclical", optim__cycle_steps=58) == []  # 58 steps after the 2-step warmup
    assert doubts(optim__schedule="cyclical", optim__cycle_mode="one_cycle") == []  # no period
    assert doubts(optim__schedule="cosine") == []
    assert doubts(optim__schedule="cyclical", optim__cycle_steps=59) == [
        "config.optim.cycle_steps=59 is longer than the 58 steps after the warmup: its first cycle (lr -> final_lr "
        "-> lr) is not over by the run's end. Shorten it (e.g. 14) to see the schedule repeat."]
    assert "restart_steps=1000 is longer than the 58 steps" in doubts(optim__schedule="cosine_restarts")[0]

    setup.setup_run(tiny_config(optim__schedule="cyclical"), str(tmp_path)).close()  # the default 1000-step cycle
    assert "config.optim.cycle_steps=1000 is longer than the 4 steps after the warmup" in caplog.text


def test_another_schedules_fields_are_not_checked():
    config_lib.validate(tiny_config(optim__schedule="cosine", optim__cooldown_fraction=5.0, optim__restart_mult=0.1))
    config_lib.validate(tiny_config(optim__schedule="constant", optim__lr=5e-5))  # final_lr 1e-4: not read


def test_resuming_a_cooled_down_wsd_run_with_more_steps_warns_that_the_rate_jumps_back_up(tmp_path):
    from helpers import cli_flags, run_cli
    from test_end_to_end import CONFIG

    wsd = dict(optim__schedule="wsd", optim__warmup_steps=1, optim__cooldown_fraction=0.5, train__checkpoint_every=4)
    first = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(train__steps=4, **wsd))
    assert "learning rate of" not in first.stderr
    longer = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(train__steps=8, **wsd))
    assert ("resuming at step 4 at a learning rate of 0.001, where the checkpoint's run (train.steps 4) was at "
            "0.0001: the schedule is recomputed over train.steps=8. To continue a WSD run from its stable phase, "
            "branch from a checkpoint before its cooldown") in longer.stderr


@pytest.mark.bench
def test_the_schedules_bench_prints_every_schedule_over_the_recipes_run():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "schedules.py"),
                             "--config=configs/shakespeare_char.py", "--points=5"], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line.split()[-5:] for line in result.stdout.splitlines()[2:]}
    assert result.stdout.splitlines()[1].split()[1:] == ["0", "500", "1000", "1500", "2000"]
    assert set(rows) == {"cosine", "linear", "constant", "rsqrt", "wsd linear", "wsd cosine", "wsd 1-sqrt",
                         "step (1000, 1500)", "cyclical triangular", "cyclical one_cycle", "cosine_restarts"}
    assert rows["wsd 1-sqrt"] == ["0.00e+00", "1.00e-03", "1.00e-03", "1.00e-03", "1.00e-04"]
    assert rows["step (1000, 1500)"][2:] == ["1.00e-04", "1.00e-05", "1.00e-05"]
