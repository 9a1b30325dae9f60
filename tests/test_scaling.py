"""Scaling-law fits: the Chinchilla replication recovered, and known laws recovered from
synthetic runs by every approach, within the intervals each reports."""

import csv
import json
import os
import re

import numpy as np
import pytest

from lm.scaling import designs, laws, sweeps

DATA = os.path.join(os.path.dirname(__file__), "data", "chinchilla", "svg_extracted_data.csv")


def chinchilla_runs() -> laws.Runs:
    with open(DATA, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    n, c, loss = (np.array([float(r[k]) for r in rows]) for k in ("Model Size", "Training FLOP", "loss"))
    keep = np.argsort(loss)[:-5]  # the replication drops the 5 highest-loss runs
    return laws.Runs.of(n[keep], c[keep] / (6 * n[keep]), loss[keep], c=c[keep])


def test_approach_3_on_the_chinchilla_runs_recovers_the_replications_estimates():
    fit = laws.parametric(chinchilla_runs())
    assert abs(fit.E - 1.817) < 0.01 and abs(fit.alpha - 0.347) < 0.01 and abs(fit.beta - 0.367) < 0.01
    assert fit.A == pytest.approx(477.8, rel=0.1) and fit.B == pytest.approx(2143.9, rel=0.1)


def test_isoflop_points_spend_their_budget_on_distinct_sizes_of_one_shape_family():
    from lm.configs import shakespeare_char

    config = shakespeare_char.get_config()
    points = designs.isoflop(config, [1e12], sizes=5, vocab_size=68)
    assert len({(p["model.num_layers"], p["model.d_model"]) for p in points}) == len(points) >= 4
    tokens_per_step = config.train.batch_size * config.data.seq_len
    for point in points:
        shape = {k.split(".")[1]: v for k, v in point.items() if k.startswith("model.")}
        spent = designs.flops_per_token(config, shape, 68) * point["train.steps"] * tokens_per_step
        assert spent == pytest.approx(1e12, rel=0.01) and point["sweep.budget"] == 1e12
        assert shape["d_model"] % 16 == 0 and 16 <= shape["d_model"] / shape["num_layers"] <= 64
    assert designs.shape_for(1e6) == dict(num_layers=4, d_model=144, num_heads=9, head_dim=16, d_ff=576)


def test_grid_and_learning_rate_designs_cross_every_size_with_every_token_count_and_rate():
    from lm.configs import shakespeare_char

    config = shakespeare_char.get_config()
    grid = designs.size_by_tokens(config, [2e4, 1e5], [1e6, 4e6])
    tokens_per_step = config.train.batch_size * config.data.seq_len
    assert [(p["model.d_model"], p["train.steps"]) for p in grid] == [
        (32, round(1e6 / tokens_per_step)), (32, round(4e6 / tokens_per_step)),
        (64, round(1e6 / tokens_per_step)), (64, round(4e6 / tokens_per_step))]
    swept = designs.learning_rates(grid[:2], [1e-3, 3e-3])
    assert [p["optim.lr"] for p in swept] == [1e-3, 3e-3, 1e-3, 3e-3] and swept[1]["model.d_model"] == 32


def test_wsd_branches_give_each_size_one_stable_run_and_a_cooldown_branch_per_budget():
    from lm.configs import shakespeare_char
    from lm.scaling import branches
    from lm.scaling.sweeps import point_name

    config = shakespeare_char.get_config()  # warmup 100 steps, 12 x 64 tokens a step
    per_step = config.train.batch_size * config.data.seq_len
    points = designs.wsd_branches(config, [2e4, 1e5], [k * 500 * per_step for k in (4, 1, 2, 3)])
    assert len(points) == 10
    for size in (32, 64):
        stable, *cooldowns = [p for p in points if p["model.d_model"] == size]
        # The WSD run of the largest budget (2000 steps), stopped where its cooldown starts.
        assert stable["optim.schedule"] == "wsd" and stable["optim.decay_steps"] == 2000
        assert stable["train.steps"] == 1600 and stable["train.keep_steps"] == (400, 800, 1200, 1600)
        assert "train.branch_from" not in stable
        assert [(p["train.steps"], p["train.branch_step"]) for p in cooldowns] == [
            (500, 400), (1000, 800), (1500, 1200), (2000, 1600)]
        assert {p["train.branch_from"] for p in cooldowns} == {branches.PREFIX + point_name(stable)}
        assert all(p["optim.schedule"] == "wsd" and p["optim.cooldown_fraction"] == 0.2 for p in cooldowns)
    with pytest.raises(ValueError, match=r"the token budget 76800 \(100 steps\) would branch at step 80, inside the "
                                         r"stable run's warmup \(config.optim.warmup_steps=100\). Fix: drop budgets "
                                         r"below 125 steps \(96000 tokens\) from `tokens`"):
        designs.wsd_branches(config, [2e4], [100 * per_step, 1000 * per_step])


def test_wsd_branches_refuse_a_budget_whose_cooldown_rounds_to_under_two_steps_naming_the_least_that_works():
    from lm.configs import shakespeare_char

    config = shakespeare_char.get_config()
    config.optim.warmup_steps = 0
    per_step = config.train.batch_size * config.data.seq_len
    for steps, cooldown in ((2, 0), (7, 1)):  # a 1-step cooldown's one update is at the peak: it cools nothing
        with pytest.raises(ValueError, match=rf"the token budget {steps * per_step} \({steps} steps\) leaves its "
                                             rf"cooldown {cooldown} step\(s\) .*Fix: drop budgets below 8 steps "
                                             rf"\({8 * per_step} tokens\)"):
            designs.wsd_branches(config, None, [steps * per_step, 10 * per_step])
    assert designs.wsd_branches(config, None, [8 * per_step])[1]["train.branch_step"] == 6
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"cooldown_fraction=.* Fix: give one in \(0, 1\)"):
            designs.wsd_branches(config, None, [10 * per_step], cooldown_fraction=fraction)
    with pytest.raises(ValueError, match="`tokens` is empty"):
        designs.wsd_branches(config, None, [])


@pytest.mark.parametrize("design, call", [
    ("wsd_branches", lambda c, v: designs.wsd_branches(c, [v], [1e6])),
    ("wsd_branches", lambda c, v: designs.wsd_branches(c, None, [v])),
    ("isoflop", lambda c, v: designs.isoflop(c, [v])),
    ("size_by_tokens", lambda c, v: designs.size_by_tokens(c, [1e5], [v])),
])
@pytest.mark.parametrize("value", [0, -1e5, float("nan"), float("inf")])
def test_designs_refuse_sizes_tokens_and_budgets_that_are_not_positive_naming_the_argument(design, call, value):
    from lm.configs import shakespeare_char

    with pytest.raises(ValueError, match=rf"{design}: `\w+` holds {re.escape(repr(value))}, not a finite number > 0"):
        call(shakespeare_char.get_config(), value)


def test_a_branchs_row_counts_its_cooldown_and_the_stable_steps_since_the_previous_branch_point():
    from lm.scaling import branches
    from lm.scaling.sweeps import Point

    stable = Point("s", {"train.steps": 16})
    cooldowns = [Point(name, {"train.branch_from": "points/s", "train.branch_step": at, "train.steps": steps})
                 for name, at, steps in (("b20", 16, 20), ("b10", 8, 10), ("b5", 4, 5))]
    points = [stable, *cooldowns]
    steps = {p.name: p.overrides["train.steps"] for p in points}
    spent = {p.name: branches.spent_steps(p, points, steps) for p in cooldowns}
    assert spent == {"b5": 1 + 4, "b10": 2 + 4, "b20": 4 + 8}
    assert sum(spent.values()) == 16 + 1 + 2 + 4  # the stable run counted once
    assert branches.spent_steps(stable, points, steps) == 16 and branches.parents(points) == {"s"}


TRUE = laws.Parametric(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.30)


def synthetic_runs(seed: int = 0, noise: float = 0.003) -> tuple[laws.Runs, laws.Runs]:
    """(IsoFLOP design: 5 budgets x 13 sizes around the optimum; N x D grid: 8 x 8), with
    multiplicative lognormal noise on the loss."""
    rng = np.random.default_rng(seed)
    budgets = np.repeat(np.logspace(18, 21, 5), 13)
    n = TRUE.optimal(budgets)[0] * np.tile(np.logspace(-1, 1, 13), 5)
    iso = laws.Runs.of(n, budgets / (6 * n), TRUE(n, budgets / (6 * n)), budget=budgets)
    n, d = (x.ravel() for x in np.meshgrid(np.logspace(7, 10, 8), np.logspace(9, 12, 8)))
    grid = laws.Runs.of(n, d, TRUE(n, d))
    noisy = lambda r: laws.Runs(r.n, r.d, r.c, r.loss * np.exp(rng.normal(0, noise, len(r))), r.budget)
    return noisy(iso), noisy(grid)


def within(interval: tuple[float, float], value: float) -> bool:
    return interval[0] <= value <= interval[1]


@pytest.mark.optimized  # the fits' many iterations run faster optimised
def test_every_approach_recovers_the_true_exponents_of_synthetic_runs_within_its_intervals():
    iso, grid = synthetic_runs()
    a, b = TRUE.beta / (TRUE.alpha + TRUE.beta), TRUE.alpha / (TRUE.alpha + TRUE.beta)

    approach_2 = laws.bootstrap(laws.isoflop, iso, samples=60)
    assert within(approach_2["a"], a) and within(approach_2["b"], b), approach_2

    both = laws.Runs(*(np.concatenate([getattr(iso, f), getattr(grid, f)]) for f in ("n", "d", "c", "loss", "budget")))
    fit = laws.parametric(both)
    approach_3 = laws.bootstrap(lambda r: laws.parametric(r, starts=2, initial=[laws.theta_of(fit)]), both,
                                samples=40)
    assert within(approach_3["alpha"], TRUE.alpha) and within(approach_3["beta"], TRUE.beta), approach_3
    assert approach_3["alpha"][1] - approach_3["alpha"][0] < 0.1  # an informative interval, not a wide one

    # Kaplan: L(N) and L(D) on the grid's frontiers (the other term is then a constant),
    # L(C) on the IsoFLOP runs' frontier, where L - E falls as C^(-alpha beta / (alpha + beta)).
    kaplan_grid = laws.bootstrap(laws.kaplan, grid, samples=60)
    assert within(kaplan_grid["N.alpha"], TRUE.alpha) and within(kaplan_grid["D.alpha"], TRUE.beta), kaplan_grid
    kaplan_iso = laws.bootstrap(laws.kaplan, iso, samples=60)
    assert within(kaplan_iso["C.alpha"], TRUE.alpha * TRUE.beta / (TRUE.alpha + TRUE.beta)), kaplan_iso


@pytest.mark.slow
def test_the_scaling_notebook_runs_top_to_bottom_on_the_stored_sweep_results(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    notebooks = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")
    notebook = nbformat.read(os.path.join(notebooks, "scaling_laws.ipynb"), as_version=4)
    monkeypatch.setenv("LM_PLOTS", str(tmp_path))
    monkeypatch.setenv("LM_BOOTSTRAP", "10")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": notebooks}}).execute()
    printed = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.outputs)
    assert "Approach 2 (IsoFLOP, 3 budgets)" in printed and "Approach 3, L(N, D)" in printed
    assert "approach_3: C=" in printed
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".png")) == [
        "isoflop_profiles.png", "loss_contours.png", "loss_vs_compute.png", "optimal_allocation.png"]


def test_a_cell_that_is_not_a_positive_number_is_named_by_row_and_column_and_short_frontiers_say_why(tmp_path):
    from lm.scaling import fits, results

    rows = [{"parameters": str(n), "tokens": str(20 * n), "val_loss": str(3 - 0.1 * i)}
            for i, n in enumerate((1e6, 2e6, 4e6))]
    with pytest.raises(results.ResultsError, match=r"t.csv row 2, column 'val_loss': 'oops' is not a number"):
        results.to_runs([rows[0], {**rows[1], "val_loss": "oops"}], "t.csv")
    with pytest.raises(results.ResultsError, match=r"t.csv row 1: N, D, C and the loss must be positive numbers"):
        results.to_runs([{**rows[0], "parameters": "-5"}], "t.csv")
    with pytest.raises(results.ResultsError, match="--drop_highest=3 drops all 3 finished runs"):
        results.to_runs(rows, "t.csv", drop_highest=3)
    runs = results.to_runs(rows + [{"parameters": "8e6", "val_loss": ""}], "t.csv")  # unfinished: left out
    assert len(runs) == 3 and runs.c[0] == 6 * 1e6 * 20e6

    # One size, three token counts: L(D) has 3 frontier points (E is not fitted), L(N) and L(C) too few.
    one_size = laws.Runs.of([1e6] * 3, [1e7, 2e7, 4e7], [3.0, 2.9, 2.8], c=[1e14, 1e14 * 1.005, 1e14 * 1.008])
    fitted, intervals, skipped = fits.fit_all(one_size, 0, 0)
    assert set(fitted["kaplan"]) == {"D"} and laws.kaplan_skipped(one_size).keys() == {"N", "C"}
    assert skipped["kaplan L(N)"].startswith("its frontier has 1 point(s); a power law needs at least 3. Fix:")
    lines = fits.report(one_size, fitted, intervals, skipped, 1e15)
    assert any(line.startswith("  L(D): E=0.0000 (not fitted: under 4 frontier points)") for line in lines)
    assert any(line.startswith("  L(D):") and line.endswith("(3 frontier points for 2 parameters: the fit has "
                                                            "little to spare and its intervals mean little)")
               for line in lines)
    four = laws.Runs.of([1e6] * 4, [1e7, 2e7, 4e7, 8e7], [3.0, 2.9, 2.85, 2.82], c=[1e14 * k for k in (1, 2, 4, 8)])
    fitted4 = fits.fit_all(four, 0, 0)[0]
    l_d = [line for line in fits.report(four, fitted4, {}, {}, 1e15) if line.startswith("  L(D):")][0]
    assert "E=0.0000" not in l_d and l_d.endswith("(4 frontier points for 3 parameters: the fit has little to spare "
                                                  "and its intervals mean little)")
    six = laws.Runs.of([1e6] * 6, [1e7 * 2 ** k for k in range(6)], [3.0, 2.9, 2.85, 2.82, 2.8, 2.79],
                       c=[1e14 * 2 ** k for k in range(6)])
    assert "to spare" not in "\n".join(fits.report(six, fits.fit_all(six, 0, 0)[0], {}, {}, 1e15))
    assert "kaplan L(C): skipped: its frontier has 1 point(s)" in "\n".join(lines)


def test_the_wsd_bench_matches_budgets_by_tokens_and_divides_the_compute_spent():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wsd_bench", os.path.join(os.path.dirname(__file__), "..",
                                                                            "bench", "wsd_branches.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    branches = [{"tokens": 200, "val_loss": 2.0, "spent_flops": 180.0},  # 16 stable + 2 cooldown steps
                {"tokens": 100, "val_loss": 2.5, "spent_flops": 100.0}]
    cosine = [{"tokens": 100, "val_loss": 2.49, "flops": 100.0}, {"tokens": 200, "val_loss": 2.05, "flops": 200.0}]
    lines, ratio, gap = bench.compare(branches, cosine, tokens_per_step=10)
    assert lines[2].startswith("| 10 | 2.5000 | 2.4900 | +0.0100 |") and lines[3].startswith("| 20 | 2.0000 |")
    assert ratio == pytest.approx(280 / 300) and gap == pytest.approx(0.05)


def test_the_wsd_bench_averages_each_budgets_difference_over_seeds_and_lists_each_seeds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wsd_bench", os.path.join(os.path.dirname(__file__), "..",
                                                                            "bench", "wsd_branches.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pair = lambda wsd, cos: ([{"tokens": 100, "val_loss": wsd}], [{"tokens": 100, "val_loss": cos}])
    lines, largest = bench.mean_over_seeds([pair(2.0, 2.03), pair(2.1, 2.11)], tokens_per_step=10)
    assert lines[2] == "| 10 | 2.0500 | 2.0700 | -0.0200 | 0.0100 | -0.0300, -0.0100 |"  # sd 0.0141 / sqrt 2
    assert largest == pytest.approx(0.02)


def test_the_wsd_recipe_takes_a_cooldown_shape_for_its_branches_and_one_seed_for_both_kinds():
    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "scaling", "shakespeare_wsd.py")
    base, points = sweeps.load(f"{recipe}:branches,20,shape=linear,seed=3")
    assert (base.seed, base.optim.cooldown_shape, len(points)) == (3, "linear", 5)
    assert sweeps.load(f"{recipe}:cosine,seed=2")[0].seed == 2
    for bad in ("cosine,20,shape=linear", "branches,20,shape=square", "branches,20,seed=x", "branches,20,30"):
        with pytest.raises(sweeps.SweepError, match=f"unknown argument '{bad}'.*shakespeare_wsd.py:branches,500,"
                                                    "shape=linear,seed=1"):
            sweeps.load(f"{recipe}:{bad}")


def test_the_optimizer_table_gives_each_optimizers_best_rate_and_marks_one_at_its_sweeps_edge():
    import importlib.util

    bench_dir = os.path.join(os.path.dirname(__file__), "..", "bench")
    spec = importlib.util.spec_from_file_location("optimizer_table", os.path.join(bench_dir, "optimizer_table.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    spec = importlib.util.spec_from_file_location("sweep", os.path.join(bench_dir, "..", "configs", "scaling",
                                                                        "shakespeare_optimizers.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    row = lambda name, rate, loss: {"overrides": json.dumps(sweep.point(name, rate)), "val_loss": loss}
    rows = [row("adamw", 1e-3, 1.80), row("adamw", 2e-3, 1.75), row("adamw", 4e-3, 1.78),
            row("muon", 0.01, 1.70), row("muon", 0.02, 1.72)]
    lines = bench.table(rows, sweep.rate_of, list(sweep.RATES))
    assert lines[2] == "| adamw | 1.7500 | 0.002 | 0.001: 1.8000, 0.002: 1.7500, 0.004: 1.7800 |"
    assert lines[3].startswith("| muon | 1.7000 | 0.01 (edge) |")  # Muon's rate is the matrices'
    assert sweep.point("muon", 0.02)["optim.groups.matrix.lr_scale"] == pytest.approx(20)
    assert all(sweep.point(n, r)["optim.final_lr"] == pytest.approx(sweep.point(n, r)["optim.lr"] / 10)
               for n, rates in sweep.RATES.items() for r in rates)
