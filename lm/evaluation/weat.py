"""WEAT, the Word Embedding Association Test (Caliskan, Bryson & Narayanan, Science 2017),
on a model's token embeddings.

Targets X, Y (e.g. flowers, insects) and attributes A, B (pleasant, unpleasant):
s(w) = mean cos(w, a) - mean cos(w, b); the effect size is
(mean_X s - mean_Y s) / std_{X ∪ Y} s, and the p-value the share of equal-size
re-partitions of X ∪ Y whose statistic sum_X s - sum_Y s is at least the observed one.
A word's vector is the mean of its tokens' embeddings.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from lm.errors import UsageError


def word_vectors(embedding_VD: np.ndarray, encode: Callable[[str], np.ndarray], words: Sequence[str]) -> np.ndarray:
    vectors = []
    for word in words:
        ids = encode(word)
        if len(ids) == 0:
            raise UsageError(f"the word {word!r} encodes to no tokens. Fix: remove it from the word set.")
        vectors.append(np.asarray(embedding_VD)[ids].mean(0))
    return np.stack(vectors)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def association(w_ND: np.ndarray, a_MD: np.ndarray, b_KD: np.ndarray) -> np.ndarray:
    """s(w, A, B) for each row w."""
    w, a, b = _unit(w_ND), _unit(a_MD), _unit(b_KD)
    return (w @ a.T).mean(1) - (w @ b.T).mean(1)


def weat(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, permutations: int = 10_000,
         seed: int = 0) -> dict[str, float]:
    """Effect size, test statistic and one-sided permutation p-value; exact over every
    partition when there are at most `permutations` of them."""
    if len(x) != len(y) or len(x) < 2 or len(a) < 1 or len(b) < 1:
        raise UsageError(f"WEAT needs target sets of equal size >= 2 and non-empty attribute sets; got "
                          f"|X|={len(x)}, |Y|={len(y)}, |A|={len(a)}, |B|={len(b)}. Fix: balance the word sets.")
    s = association(np.concatenate([x, y]), a, b)
    n = len(x)
    statistic = s[:n].sum() - s[n:].sum()
    effect_size = (s[:n].mean() - s[n:].mean()) / s.std(ddof=1)
    total = s.sum()
    if math.comb(2 * n, n) <= permutations:
        subsets = (list(c) for c in itertools.combinations(range(2 * n), n))
    else:
        rng = np.random.default_rng(seed)
        subsets = (rng.permutation(2 * n)[:n] for _ in range(permutations))
    stats = np.array([2 * s[idx].sum() - total for idx in subsets])  # sum_X' s - sum_Y' s
    return {"effect_size": float(effect_size), "statistic": float(statistic),
            "p_value": float(np.mean(stats >= statistic - 1e-12))}
