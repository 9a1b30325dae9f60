"""Learning-rate schedules and AdamW's weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from lm import optim


def lr(config, step):
    return float(optim.schedule(config.optim, config.train.steps)(step))


def test_cosine_warms_up_linearly_then_decays_to_final_lr():
    c = tiny_config(train__steps=1000, optim__warmup_steps=100, optim__lr=1e-3, optim__final_lr=1e-4)
    assert lr(c, 0) == 0.0
    assert lr(c, 50) == pytest.approx(5e-4)
    assert lr(c, 100) == pytest.approx(1e-3)
    assert lr(c, 550) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-4)  # cosine midpoint
    assert lr(c, 1000) == pytest.approx(1e-4)


@pytest.mark.parametrize("kind, at_end", [("linear", 1e-4), ("constant", 1e-3)])
def test_linear_and_constant_after_warmup(kind, at_end):
    c = tiny_config(train__steps=1000, optim__warmup_steps=100, optim__schedule=kind, optim__final_lr=1e-4)
    assert lr(c, 100) == pytest.approx(1e-3)
    assert lr(c, 1000) == pytest.approx(at_end)


def test_rsqrt_decays_as_inverse_square_root_of_the_step():
    c = tiny_config(train__steps=1000, optim__warmup_steps=100, optim__schedule="rsqrt")
    assert lr(c, 100) == pytest.approx(1e-3)
    assert lr(c, 400) == pytest.approx(1e-3 * (100 / 400) ** 0.5)


def test_weight_decay_shrinks_matrices_but_not_norms_or_biases():
    c = tiny_config(optim__lr=0.1, optim__weight_decay=0.5, optim__warmup_steps=0, optim__schedule="constant")
    params = {"kernel": jnp.ones((3, 4)), "embedding": jnp.ones((5, 3)), "scale": jnp.ones(3), "bias": jnp.ones(4)}
    tx = optim.make(c.optim, c.train.steps)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert np.allclose(updates["kernel"], -0.1 * 0.5) and np.allclose(updates["embedding"], -0.1 * 0.5)
    assert np.all(updates["scale"] == 0) and np.all(updates["bias"] == 0)


def test_gradients_are_clipped_to_the_global_norm_before_adamw():
    clipped = tiny_config(optim__grad_clip=1.0, optim__warmup_steps=0, optim__schedule="constant")
    unclipped = tiny_config(optim__grad_clip=0.0, optim__warmup_steps=0, optim__schedule="constant")
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
    large = {"w": jnp.full((2, 2), 3.0), "b": jnp.array([4.0, 0.0, 0.0])}  # global norm 7.2: clipped
    small = {"w": jnp.full((2, 2), 0.1), "b": jnp.array([0.2, 0.1, 0.0])}  # norm < 1: untouched
    unit = jax.tree.map(lambda x: x / float(optax.tree.norm(large)), large)

    def second_update(config, first, second):
        # Adam's first update is scale-free; the second shows what the moments saw.
        tx = optim.make(config.optim, config.train.steps)
        opt_state = tx.update(first, tx.init(params), params)[1]
        return jax.tree.leaves(tx.update(second, opt_state, params)[0])

    for a, b in zip(second_update(clipped, large, small), second_update(unclipped, unit, small)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    without_clipping = second_update(unclipped, large, small)
    assert not np.allclose(without_clipping[1], second_update(clipped, large, small)[1], rtol=1e-3)
