"""The four scaling plots, each a function from runs and fits to a saved figure."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lm.scaling import laws  # noqa: E402


def _save(fig, directory: str, name: str, formats: tuple[str, ...]) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for fmt in formats:
        paths.append(os.path.join(directory, f"{name}.{fmt}"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def loss_vs_compute(runs: laws.Runs, law: laws.PowerLaw | None, directory: str, formats=("png", "svg")) -> list[str]:
    """Every run's loss against its FLOPs, the frontier, and the fitted L(C)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = ax.scatter(runs.c, runs.loss, c=np.log10(runs.n), cmap="viridis", s=18, label="runs")
    fig.colorbar(points, label="log10 parameters")
    edge = laws.frontier(runs.c, runs.loss)
    ax.plot(runs.c[edge], runs.loss[edge], "k.-", lw=1, label="frontier")
    if law is not None:
        c = np.geomspace(runs.c.min(), runs.c.max() * 10, 100)
        ax.plot(c, law(c), "r--", label=f"L(C) = {law.E:.2f} + (C_c/C)^{law.alpha:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss", title="Loss vs compute")
    ax.legend(fontsize=8)
    return _save(fig, directory, "loss_vs_compute", formats)


def isoflop_profiles(runs: laws.Runs, fit: laws.IsoFLOPFit, directory: str, formats=("png", "svg")) -> list[str]:
    """Loss against N for each IsoFLOP budget, with its parabola and minimum."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(fit.budgets)))
    for c, p, n_opt, l_opt, color in zip(fit.budgets, fit.parabolas, fit.n_opt, fit.loss_opt, colors):
        idx = runs.budget == c
        ax.scatter(runs.n[idx], runs.loss[idx], color=color, s=18, label=f"C = {c:.2g}")
        n = np.geomspace(runs.n[idx].min(), runs.n[idx].max(), 100)
        ax.plot(n, np.polyval(p, np.log(n)), color=color, lw=1)
        ax.plot([n_opt], [l_opt], marker="*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles (stars: fitted minima)")
    ax.legend(fontsize=8)
    return _save(fig, directory, "isoflop_profiles", formats)


def loss_contours(runs: laws.Runs, fit: laws.Parametric, directory: str, formats=("png", "svg")) -> list[str]:
    """The fitted L(N, D) as contours over N and D, the runs, and the compute-optimal line."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    n = np.geomspace(runs.n.min() / 3, runs.n.max() * 3, 120)
    d = np.geomspace(runs.d.min() / 3, runs.d.max() * 3, 120)
    nn, dd = np.meshgrid(n, d)
    contours = ax.contour(nn, dd, fit(nn, dd), levels=12, cmap="viridis")
    ax.clabel(contours, fontsize=7)
    ax.scatter(runs.n, runs.d, c="k", s=10, label="runs")
    c = np.geomspace((6 * nn * dd).min(), (6 * nn * dd).max(), 50)
    n_opt, d_opt = fit.optimal(c)
    ax.plot(n_opt, d_opt, "r--", label="compute-optimal")
    ax.set(xscale="log", yscale="log", xlim=(n[0], n[-1]), ylim=(d[0], d[-1]), xlabel="parameters N",
           ylabel="tokens D",
           title=f"L(N, D) = {fit.E:.2f} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return _save(fig, directory, "loss_contours", formats)


def optimal_allocation(fits: dict[str, object], budgets: np.ndarray, directory: str,
                       formats=("png", "svg")) -> list[str]:
    """N_opt(C) and D_opt(C) of each fit that predicts them (Approaches 2 and 3)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    c = np.geomspace(budgets.min() / 3, budgets.max() * 100, 100)
    for name, fit in fits.items():
        n_opt, d_opt = fit.optimal(c)
        left.plot(c, n_opt, label=name)
        right.plot(c, d_opt, label=name)
        if isinstance(fit, laws.IsoFLOPFit):
            left.scatter(fit.budgets, fit.n_opt, marker="*", s=60)
            right.scatter(fit.budgets, fit.budgets / (6 * fit.n_opt), marker="*", s=60)
    for ax, what in ((left, "N_opt (parameters)"), (right, "D_opt (tokens)")):
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=what)
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal allocation")
    return _save(fig, directory, "optimal_allocation", formats)
