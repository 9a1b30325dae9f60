"""Fitting scaling laws to runs (N parameters, D tokens, C FLOPs, final loss L).

- Kaplan et al. 2020: L(X) = E + (X_c / X)^alpha_X on the loss frontier in X = N, D or C
  (E = 0 is Kaplan's own form; the offset makes the fits honest at small scale).
- Chinchilla Approach 2 (Hoffmann et al. 2022): for each IsoFLOP budget a parabola of L in
  log N gives N_opt(C); power laws N_opt = k_N C^a and D_opt = k_D C^b through them.
- Chinchilla Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as Besiroglu et al.
  2024 do: Huber loss (delta 1e-3) on log L, the log-sum-exp form
  LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, and L-BFGS from a
  grid of initialisations.

Every fit has `bootstrap` intervals: the runs resampled with replacement and refitted.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np
from scipy import optimize, special


class FitError(ValueError):
    """The runs cannot support the fit asked for; the message says why and what to add."""


@dataclasses.dataclass(frozen=True)
class Runs:
    """Runs as columns: parameters, training tokens, training FLOPs, final loss, and the
    IsoFLOP budget each belongs to (0 when not part of an IsoFLOP design)."""

    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray
    budget: np.ndarray

    @classmethod
    def of(cls, n, d, loss, c=None, budget=None) -> Runs:
        n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
        c = 6 * n * d if c is None else np.asarray(c, np.float64)
        budget = np.zeros_like(n) if budget is None else np.asarray(budget, np.float64)
        return cls(n, d, c, loss, budget)

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, index: np.ndarray) -> Runs:
        return Runs(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


# --- Kaplan-style power laws on the frontier --------------------------------------------

@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(x) = E + (x_c / x)^alpha."""

    E: float
    x_c: float
    alpha: float

    def __call__(self, x):
        return self.E + (self.x_c / np.asarray(x, np.float64)) ** self.alpha


def frontier(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the runs on the loss frontier in x: the best run at each x (within 1%)
    that beats every run with smaller x."""
    order = np.lexsort((loss, x))
    best, kept, last_x = np.inf, [], None
    for i in order:
        if last_x is not None and x[i] <= last_x * 1.01:
            continue  # a worse run at (nearly) the same x
        last_x = x[i]
        if loss[i] < best:
            best = loss[i]
            kept.append(i)
    return np.asarray(kept, int)


def fit_power_law(x: np.ndarray, loss: np.ndarray, irreducible: bool = True) -> PowerLaw:
    """Least squares on log L of L = E + (x_c / x)^alpha (E = 0 if not `irreducible`)."""
    x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
    need = 4 if irreducible else 3  # one more point than parameters
    if len(x) < need:
        raise FitError(f"a power law with{'' if irreducible else 'out'} an irreducible term needs at least "
                       f"{need} frontier points; got {len(x)}. Fix: add runs at more sizes, token counts or "
                       "budgets.")
    log_x, log_l = np.log(x), np.log(loss)
    slope, intercept = np.polyfit(log_x, log_l, 1)  # E = 0: log L = alpha log x_c - alpha log x
    if not irreducible:
        return PowerLaw(0.0, float(np.exp(intercept / -slope)), float(-slope))

    def residuals(theta):  # theta = (log E, alpha log x_c, alpha)
        log_e, k, alpha = theta
        return np.logaddexp(log_e, k - alpha * log_x) - log_l

    starts = [(np.log(f * loss.min()), intercept, -slope) for f in (0.2, 0.5, 0.8, 0.95)]
    best = min((optimize.least_squares(residuals, s, method="lm") for s in starts), key=lambda r: r.cost)
    log_e, k, alpha = best.x
    return PowerLaw(float(np.exp(log_e)), float(np.exp(k / alpha)), float(alpha))


def kaplan(runs: Runs, irreducible: bool = True) -> dict[str, PowerLaw]:
    """L(N), L(D) and L(C), each on its frontier. A frontier too short for the offset E
    (under 4 points, e.g. the 3 budgets of a small IsoFLOP sweep) gets Kaplan's own form,
    E = 0; one shorter still is left out (`kaplan_skipped` says why). Raises FitError only
    if no law can be fitted."""
    laws, reasons = {}, []
    for name, x in (("N", runs.n), ("D", runs.d), ("C", runs.c)):
        idx = frontier(x, runs.loss)
        try:
            laws[name] = fit_power_law(x[idx], runs.loss[idx], irreducible and len(idx) >= 4)
        except FitError as e:
            reasons.append(f"L({name}): {e}")
    if not laws:
        raise FitError(" ".join(reasons))
    return laws


def kaplan_skipped(runs: Runs) -> dict[str, str]:
    """Why `kaplan` leaves out each law it leaves out, {"N": reason, ...}: a frontier of
    fewer than 3 points (the fewest `fit_power_law` takes, for E = 0)."""
    return {name: f"its frontier has {len(frontier(x, runs.loss))} point(s); a power law needs at least 3. "
                  "Fix: add runs at more sizes, token counts or budgets."
            for name, x in (("N", runs.n), ("D", runs.d), ("C", runs.c)) if len(frontier(x, runs.loss)) < 3}


# --- Chinchilla Approach 2: IsoFLOP profiles --------------------------------------------

@dataclasses.dataclass(frozen=True)
class IsoFLOPFit:
    budgets: np.ndarray  # C of each profile
    n_opt: np.ndarray  # the parabola's minimum of each profile
    loss_opt: np.ndarray
    parabolas: np.ndarray  # [budget, 3]: L = p0 (log N)^2 + p1 log N + p2
    a: float  # N_opt = k_n C^a
    k_n: float
    b: float  # D_opt = k_d C^b, with D_opt = C / (6 N_opt)
    k_d: float

    def optimal(self, c) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(c, np.float64)
        return self.k_n * c ** self.a, self.k_d * c ** self.b


def isoflop(runs: Runs) -> IsoFLOPFit:
    """Approach 2 over the runs' IsoFLOP budgets (`Runs.budget`, at least 2 with 3+ sizes)."""
    budgets = np.unique(runs.budget[runs.budget > 0])
    profiles = []
    for c in budgets:
        idx = np.flatnonzero(runs.budget == c)
        if len(np.unique(runs.n[idx])) < 3:
            continue  # a parabola needs three sizes
        p = np.polyfit(np.log(runs.n[idx]), runs.loss[idx], 2)
        if p[0] <= 0:
            continue  # no minimum: the sizes do not bracket the optimum
        log_n_opt = -p[1] / (2 * p[0])
        profiles.append((c, np.exp(log_n_opt), np.polyval(p, log_n_opt), p))
    if len(profiles) < 2:
        raise FitError(f"Approach 2 needs at least 2 IsoFLOP budgets whose 3+ model sizes bracket a minimum; "
                       f"found {len(profiles)} among {len(budgets)} budgets. Fix: run an IsoFLOP design "
                       "(lm.scaling.designs.isoflop) with sizes on both sides of the optimum.")
    c, n_opt, loss_opt, parabolas = (np.asarray(v) for v in zip(*profiles))
    a, log_k_n = np.polyfit(np.log(c), np.log(n_opt), 1)
    d_opt = c / (6 * n_opt)
    b, log_k_d = np.polyfit(np.log(c), np.log(d_opt), 1)
    return IsoFLOPFit(c, n_opt, loss_opt, parabolas, float(a), float(np.exp(log_k_n)), float(b),
                      float(np.exp(log_k_d)))


# --- Chinchilla Approach 3: L(N, D) -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Parametric:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n, d):
        n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def optimal(self, c) -> tuple[np.ndarray, np.ndarray]:
        """Compute-optimal N and D for C = 6 N D (Hoffmann et al., eq. 4)."""
        c = np.asarray(c, np.float64)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n_opt = g * (c / 6) ** (self.beta / (self.alpha + self.beta))
        return n_opt, c / (6 * n_opt)


# Besiroglu et al.'s grid: 6 x 6 x 5 x 5 x 5 = 4,500 starts.
GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
            alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))


def _huber_lse(theta: np.ndarray, log_n, log_d, log_loss, delta: float) -> tuple[float, np.ndarray]:
    """The objective and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    lse = special.logsumexp(terms, axis=0)
    r = lse - log_loss
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r)) * np.exp(terms - lse)  # [3, runs]
    grad = np.array([dr[0].sum(), dr[1].sum(), dr[2].sum(), -(dr[0] * log_n).sum(), -(dr[1] * log_d).sum()])
    return float(value), grad


def _grid_objectives(starts: np.ndarray, log_n, log_d, log_loss, delta: float) -> np.ndarray:
    a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
    lse = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    r = np.abs(lse - log_loss)
    return np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta)).sum(axis=1)


def parametric(runs: Runs, delta: float = 1e-3, starts: int | None = 100,
               initial: Sequence[np.ndarray] = ()) -> Parametric:
    """Approach 3: L-BFGS from the `starts` best points of GRID by objective (None: all
    4,500, as Besiroglu et al.; the best 100 find the same optimum on their data, 35x
    faster) and from `initial` (theta vectors, see `theta_of`); the lowest objective wins."""
    if len(runs) < 5:
        raise FitError(f"L(N, D) has 5 parameters (E, A, B, alpha, beta) and needs more runs than that; got "
                       f"{len(runs)}. Fix: add runs at more model sizes and token counts.")
    log_n, log_d, log_loss = np.log(runs.n), np.log(runs.d), np.log(runs.loss)
    grid = np.array(list(itertools.product(*GRID.values())))
    if starts is not None:
        grid = grid[np.argsort(_grid_objectives(grid, log_n, log_d, log_loss, delta))[:starts]]
    best = None
    for theta in [*initial, *grid]:
        theta = np.asarray(theta, np.float64)
        result = optimize.minimize(_huber_lse, theta, args=(log_n, log_d, log_loss, delta), jac=True,
                                   method="L-BFGS-B")
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return Parametric(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta))


def theta_of(fit: Parametric) -> np.ndarray:
    return np.array([np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta])


# --- Bootstrap ---------------------------------------------------------------------------

def bootstrap(fit: Callable[[Runs], object], runs: Runs, samples: int = 200, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every float field of `fit`'s result over `samples` refits
    on runs resampled with replacement (resamples the fit rejects are skipped)."""
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(samples):
        try:
            result = fit(runs.take(rng.integers(0, len(runs), len(runs))))
        except FitError:
            continue
        for name, value in scalars(result).items():
            values.setdefault(name, []).append(value)
    tail = 100 * (1 - level) / 2
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for name, v in values.items()}


def scalars(result) -> dict[str, float]:
    """A fit's float fields by name; a dict of fits (Kaplan's) as "<key>.<field>"."""
    if isinstance(result, dict):
        return {f"{key}.{name}": value for key, part in result.items() for name, value in scalars(part).items()}
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
            if isinstance(getattr(result, f.name), float)}
