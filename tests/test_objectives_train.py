"""Each objective's CPU recipe learns: a few hundred steps take its validation loss well
below the unigram entropy of the corpus (what a model that ignores context would reach)."""

import os
import re

import numpy as np
import pytest
from helpers import REPO, run_cli, tiny_config

from lm.data.corpus import prepare

pytestmark = [pytest.mark.slow, pytest.mark.recipes, pytest.mark.optimized]  # 300 steps
RECIPES = ["causal.py", "prefix_lm.py", "masked_lm.py", "span_corruption.py", "mixture.py", "mixture.py:decoder"]


@pytest.fixture(scope="module")
def unigram_entropy(tmp_path_factory) -> float:
    """Entropy (nats) of the character distribution of the Shakespeare train split."""
    corpus = prepare(tiny_config(), str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    counts = np.bincount(np.asarray(corpus.tokens["train"]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_objective_recipe_learns_well_below_the_unigram_entropy(tmp_path, unigram_entropy, recipe):
    result = run_cli("lm.main", f"--config={os.path.join(REPO, 'configs', 'objectives', recipe)}",
                     f"--workdir={tmp_path}", "--config.train.steps=300", "--config.optim.warmup_steps=30",
                     "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
                     "--config.eval.num_batches=8", "--config.train.log_every=50", timeout=600)
    loss = float(re.search(r"final validation loss ([\d.]+)", result.stdout)[1])
    print(f"{recipe}: validation loss {loss:.4f} after 300 steps; unigram entropy {unigram_entropy:.4f}")
    assert 3.0 < unigram_entropy < 3.5
    assert loss < unigram_entropy - 0.5
