"""Learning-rate schedules and AdamW's weight-decay mask."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from helpers import tiny_config

from lm import config as config_lib
from lm.configs.finetune import base as finetune_base
from lm.finetuning import optim as finetune_optim
from lm.finetuning import tasks
from lm.model import FAMILIES, ModelConfig, build, param_kinds, presets
from lm.model.counting import abstract_params
from lm.model.layers import LoRA
from lm.runs import artifacts, checkpoint
from lm.training import loop, optim, param_groups, setup


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
    params = {"wo": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "embed": {"embedding": jnp.ones((5, 3))},
              "final_norm": {"scale": jnp.ones(3)}}
    tx = optim.make(c.optim, c.train.steps)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert np.allclose(updates["wo"]["kernel"], -0.1 * 0.5) and np.allclose(updates["embed"]["embedding"], -0.1 * 0.5)
    assert np.all(updates["final_norm"]["scale"] == 0) and np.all(updates["wo"]["bias"] == 0)


def test_gradients_are_clipped_to_the_global_norm_before_adamw():
    clipped = tiny_config(optim__grad_clip=1.0, optim__warmup_steps=0, optim__schedule="constant")
    unclipped = tiny_config(optim__grad_clip=0.0, optim__warmup_steps=0, optim__schedule="constant")
    params = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(3)}
    large = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.array([4.0, 0.0, 0.0])}  # global norm 7.2: clipped
    small = {"kernel": jnp.full((2, 2), 0.1), "bias": jnp.array([0.2, 0.1, 0.0])}  # norm < 1: untouched
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


# --- what is decayed: kernels and embedding tables, decided by what a parameter is ---

def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def decayed_paths(mask) -> set:
    return {path for path, decays in flat(mask).items() if decays}


def maps_to_or_from_the_model_dimension(box: nn.Partitioned) -> bool:
    """The spec, read from the logical axes (not the names, not the rank): a kernel or an
    embedding table has an `embed` axis and another (besides a scan's `layers`); norm
    parameters have only `norm`, a bias only its layer's output axes."""
    axes = [a for a in box.names if a != "layers"]
    return "embed" in axes and len(axes) >= 2


def boxed_params(cfg: ModelConfig):
    return abstract_params(build(cfg), 8)


def expected_decayed(boxed) -> set:
    leaves = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    return {path for path, box in leaves.items() if maps_to_or_from_the_model_dimension(box)}


def test_issue_repro_a_scanned_norm_scale_is_not_decayed_and_kernels_are():
    cfg = ModelConfig(vocab_size=64, max_len=16, num_layers=2, num_heads=2, d_model=32, head_dim=16, d_ff=64,
                      use_bias=True, scan_layers=True)
    shapes = nn.meta.unbox(boxed_params(cfg))
    params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), shapes)
    assert params["layers"]["attn_norm"]["scale"].ndim == 2  # stacked: a rank rule would decay it
    mask = optim.decay_mask(params)
    assert mask["layers"]["attn_norm"]["scale"] is False and mask["layers"]["attn"]["qkv"]["bias"] is False
    assert mask["layers"]["attn"]["qkv"]["kernel"] is True and mask["embed"]["embedding"] is True

    # The optimizer applies it: with zero gradients only decayed parameters move (by -lr * wd * p).
    c = tiny_config(optim__lr=0.1, optim__weight_decay=0.5, optim__warmup_steps=0, optim__schedule="constant")
    tx = optim.make(c.optim, c.train.steps)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for path, update in flat(updates).items():
        expected = -0.1 * 0.5 * flat(params)[path] if flat(mask)[path] else jnp.zeros_like(update)
        np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg="/".join(path))


def test_the_presets_cover_every_model_family():
    assert {settings["family"] for settings in presets.PRESETS.values()} == set(FAMILIES)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("preset", list(presets.PRESETS))
def test_decayed_parameters_are_exactly_the_kernels_and_embedding_tables(preset, scan_layers, use_bias):
    cfg = dataclasses.replace(presets.model_config(preset), scan_layers=scan_layers, use_bias=use_bias)
    boxed = boxed_params(cfg)
    params = nn.meta.unbox(boxed)
    expected = expected_decayed(boxed)
    spared = set(flat(params)) - expected
    assert expected and spared
    if scan_layers or use_bias:  # the cases a rank rule gets wrong are present
        assert any(flat(params)[path].ndim >= 2 for path in spared)

    assert decayed_paths(optim.decay_mask(params)) == expected  # pretraining

    # Fine-tuning's tree: the backbone, a classification head and LoRA adapters on every dense layer.
    lora_cfg = dataclasses.replace(cfg, lora=LoRA(rank=4, alpha=8.0, targets="."))
    inputs = (jnp.zeros((1, 8), jnp.int32),) * (2 if cfg.family == "encoder_decoder" else 1)
    adapters = jax.eval_shape(build(lora_cfg).init, jax.random.key(0), *inputs)["lora"]
    head = jax.eval_shape(lambda: tasks.init_head(jax.random.key(0), cfg.d_model, 3))
    tree = {"backbone": params, "head": head, "lora": adapters}
    for method in finetune_optim.METHODS:
        trainable, _ = finetune_optim.partition(tree, finetune_optim.trainable_mask(tree, method, ""))
        kernels_and_tables = {("backbone",) + p for p in expected} | {("head", "kernel")} | {
            ("lora",) + p for p in flat(adapters)}  # LoRA's A and B are low-rank kernels
        assert decayed_paths(optim.decay_mask(trainable)) == kernels_and_tables & set(flat(trainable))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", [
    dict(positions="learned", tie_embeddings=False, norm="layernorm", activation="gelu", use_bias=True),
    dict(positions="rope", tie_embeddings=True, norm="rmsnorm", activation="swiglu", num_kv_heads=1),
])
def test_every_parameter_the_model_can_create_has_a_kind(family, variant):
    cfg = ModelConfig(vocab_size=64, max_len=16, num_layers=2, num_heads=2, d_model=32, head_dim=16, d_ff=64,
                      family=family, **variant)
    boxed = boxed_params(cfg)
    kinds = flat(param_kinds.kinds(nn.meta.unbox(boxed)))
    assert {path for path, k in kinds.items() if k.decayed} == expected_decayed(boxed)
    if variant["positions"] == "learned":  # position tables are embedding tables, decayed
        tables = {path[-1] for path, k in kinds.items() if k is param_kinds.Kind.POSITION_EMBEDDING}
        assert tables == ({"encoder_pos_embed", "decoder_pos_embed"} if family == "encoder_decoder" else {"pos_embed"})


@pytest.mark.parametrize("path", [("layers", "ln_1", "weight"), ("attn", "rel_bias_table"), ("scale",),
                                  ("layers", "attn", "scale")])
def test_a_parameter_of_no_known_kind_fails_loudly(path):
    with pytest.raises(param_kinds.UnknownParameterError, match=f"{'/'.join(path)}.*no known kind.*Fix"):
        optim.decay_mask(traverse_util.unflatten_dict({path: jnp.ones((2, 3))}))


def test_fine_tuning_decays_the_head_kernel_and_lora_factors_but_not_norms_or_biases():
    ft = finetune_base.get_config().finetune
    ft.update(dict(learning_rate=0.1, weight_decay=0.5, warmup_steps=0, steps=10, layer_decay=1.0,
                   unfreeze_every=0, grad_clip=1.0))
    trainable = {"backbone": {"layers": {"mlp_norm": {"scale": jnp.ones((2, 4)), "bias": jnp.ones((2, 4))},
                                         "mlp": {"wi": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.ones((2, 8))}}}},
                 "head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
                 "lora": {"layers": {"mlp": {"wi": {"a": jnp.ones((2, 4, 2)), "b": jnp.ones((2, 2, 8))}}}}}
    tx = finetune_optim.make(trainable, 2, ft)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    state = tx.update(zeros, tx.init(trainable), trainable)[1]  # step 0 is warmup's zero rate
    updates, _ = tx.update(zeros, state, trainable)
    moved = {"/".join(path) for path, u in flat(updates).items() if np.any(u != 0)}
    assert moved == {"backbone/layers/mlp/wi/kernel", "head/kernel", "lora/layers/mlp/wi/a", "lora/layers/mlp/wi/b"}


# --- optim.name: every optimizer, parameter groups, Muon's matrices, schedule-free's averages ---

@functools.cache
def tiny_params(scan_layers: bool, **overrides):
    """A tiny decoder's parameter tree, biases and an untied head included, filled with
    seeded normal values (shapes from the model; its eager init takes seconds)."""
    cfg = ModelConfig(**{**dict(vocab_size=64, max_len=16, num_layers=2, num_heads=2, d_model=32, head_dim=16, d_ff=64,
                                use_bias=True, scan_layers=scan_layers, tie_embeddings=False), **overrides})
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                        nn.meta.unbox(boxed_params(cfg)))


def test_the_default_optimizer_is_todays_adamw_bit_for_bit_with_the_same_state_tree():
    c = tiny_config()
    params = tiny_params(scan_layers=True)
    grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
    today = optim.adamw(optim.schedule(c.optim, 6), c.optim.weight_decay, c.optim.grad_clip, c.optim.b1, c.optim.b2,
                        c.optim.eps)
    new = optim.make(c.optim, 6)
    states = [today.init(params), new.init(params)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])  # old checkpoints restore
    steps = [jax.jit(today.update), jax.jit(new.update)]
    for _ in range(3):
        (u_today, states[0]), (u_new, states[1]) = (step(grads, state, params) for step, state in zip(steps, states))
        for a, b in zip(jax.tree.leaves(u_today), jax.tree.leaves(u_new), strict=True):
            np.testing.assert_array_equal(a, b)


def test_group_settings_scale_the_rate_and_set_the_decay_of_each_group():
    c = tiny_config(optim__lr=0.1, optim__weight_decay=0.5, optim__warmup_steps=0, optim__schedule="constant")
    c.optim.groups.embedding.lr_scale = 0.25  # decay stays optim.weight_decay (-1)
    c.optim.groups.norm.weight_decay = 0.2
    c.optim.groups.head.weight_decay = 0.0
    params = tiny_params(scan_layers=False)
    tx = optim.make(c.optim, c.train.steps)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    # Zero gradients: each parameter moves by -lr * lr_scale * weight_decay * p, nothing else.
    expected = {"embedding": 0.1 * 0.25 * 0.5, "matrix": 0.1 * 0.5, "norm": 0.1 * 0.2, "head": 0.0, "bias": 0.0}
    for path, update in flat(updates).items():
        group = param_groups.group(path)
        np.testing.assert_allclose(update, -expected[group] * flat(params)[path], rtol=1e-6, err_msg="/".join(path))
    assert {param_groups.group(p) for p in flat(params)} == set(expected)


def test_a_group_set_for_parameters_the_model_lacks_is_warned_about_when_the_run_is_set_up(tmp_path, caplog):
    tied_no_bias = tiny_params(scan_layers=True, use_bias=False, tie_embeddings=True)
    c = tiny_config()
    assert param_groups.configured_but_empty(c.optim, tied_no_bias) == []  # defaults: nothing to warn about
    c.optim.groups.head.lr_scale, c.optim.groups.bias.weight_decay, c.optim.groups.norm.lr_scale = 0.5, 0.1, 2.0
    assert param_groups.configured_but_empty(c.optim, tied_no_bias) == ["head", "bias"]
    assert param_groups.configured_but_empty(c.optim, tiny_params(scan_layers=True)) == []

    config = tiny_config(optim__groups__head__lr_scale=0.5)  # the tiny model ties its head
    setup.setup_run(config, str(tmp_path)).close()
    assert ("config.optim.groups.head is set but this model has no parameter in the group 'head' (the head is the "
            "token embedding when model.tie_embeddings=True; group 'embedding' sets it)") in caplog.text


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "muon"])
def test_a_group_at_lr_scale_0_is_frozen_decay_included_while_the_others_train(name):
    config = tiny_config(optim__name=name, optim__schedule="constant", optim__warmup_steps=0,
                         optim__groups__embedding__lr_scale=0.0, optim__weight_decay=0.1)
    config_lib.validate(config)
    params = tiny_params(scan_layers=True)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
    tx = optim.make(config.optim, config.train.steps)
    updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
    for path, update in flat(updates).items():
        frozen = param_groups.group(path) == "embedding"
        assert (np.abs(np.asarray(update)).max() == 0.0) == frozen, (name, "/".join(path))


def test_another_optimizers_section_or_another_schedules_fields_set_are_warned_about_when_the_run_is_set_up(
        tmp_path, caplog):
    assert optim.ignored_fields(tiny_config().optim) == []
    assert optim.ignored_fields(tiny_config(optim__name="sgd", optim__sgd__momentum=0.5).optim) == []
    assert optim.ignored_fields(tiny_config(optim__schedule="step", optim__step_boundaries=(3, 4)).optim) == []
    assert optim.ignored_fields(tiny_config(optim__sgd__momentum=0.5, optim__cycle_steps=10).optim) == [
        ("optim.sgd", "optim.name='sgd'"), ("optim.cycle_steps", "optim.schedule='cyclical'")]

    setup.setup_run(tiny_config(optim__step_boundaries=(3, 4)), str(tmp_path)).close()
    assert ("config.optim.step_boundaries is set but only optim.schedule='step' reads it (this run has "
            "optim.name='adamw', optim.schedule='cosine'); the setting has no effect.") in caplog.text


def muon_moved(scan_layers: bool) -> set:
    """The parameters whose update is Muon's: with the Adam side's rate at 0 (lr_scale of
    every other group ~0), only Muon's parameters move."""
    c = tiny_config(optim__name="muon", optim__warmup_steps=0, optim__schedule="constant", optim__weight_decay=0.0)
    for name in ("embedding", "head", "norm", "bias"):
        c.optim.groups[name].lr_scale = 1e-30
    params = tiny_params(scan_layers)
    grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)
    tx = optim.make(c.optim, 6)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return {"/".join(path) for path, u in flat(updates).items() if np.max(np.abs(u)) > 1e-6}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_updates_exactly_the_hidden_matrices(scan_layers):
    layer = "layers" if scan_layers else "layer_{}"
    hidden = [f"{layer}/{kernel}/kernel" for kernel in ("attn/qkv", "attn/out", "mlp/wi", "mlp/wo")]
    expected = set(hidden) if scan_layers else {name.format(i) for name in hidden for i in range(2)}
    moved = muon_moved(scan_layers)
    assert moved == expected  # not embed/embedding, unembed/kernel, pos_embed, norms or biases
    labels = flat(optim.muon_labels(tiny_params(scan_layers)))
    assert {"/".join(p) for p, label in labels.items() if label == "muon"} == expected


def test_muon_orthogonalizes_each_layer_and_each_of_q_k_v_as_its_own_matrix():
    c = tiny_config(optim__name="muon", optim__warmup_steps=0, optim__schedule="constant", optim__weight_decay=0.0)
    stacked = tiny_params(scan_layers=True, activation="swiglu")
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), stacked)
    tx = optim.make(c.optim, 6)
    updates, _ = jax.jit(tx.update)(grads, tx.init(stacked), stacked)
    plain = optax.contrib.muon(c.optim.lr, beta=c.optim.muon.momentum, ns_steps=c.optim.muon.ns_steps)

    @jax.jit
    def alone(grad_2d):  # optax's Muon on one 2-D matrix
        return plain.update(grad_2d, plain.init(grad_2d), grad_2d)[0]

    qkv = grads["layers"]["attn"]["qkv"]["kernel"]  # [layers, embed, 3, heads, head_dim]
    for layer in range(2):
        for part in range(3):  # Q, K and V: each [embed, heads * head_dim]
            want = alone(qkv[layer, :, part].reshape(32, -1)).reshape(32, 2, 16)
            np.testing.assert_allclose(updates["layers"]["attn"]["qkv"]["kernel"][layer, :, part], want, atol=1e-6)
        out = grads["layers"]["attn"]["out"]["kernel"][layer]  # [heads, head_dim, embed]: two input axes
        np.testing.assert_allclose(updates["layers"]["attn"]["out"]["kernel"][layer],
                                   alone(out.reshape(-1, 32)).reshape(out.shape), atol=1e-6)
        wi = grads["layers"]["mlp"]["wi"]["kernel"][layer]  # SwiGLU [embed, 2, mlp]: gate and up
        for part in range(2):
            np.testing.assert_allclose(updates["layers"]["mlp"]["wi"]["kernel"][layer, :, part], alone(wi[:, part]),
                                       atol=1e-6)


def test_schedule_free_is_optax_schedule_free_adamw_with_lms_decay_mask():
    c = tiny_config(optim__name="schedule_free_adamw", optim__schedule="constant", optim__warmup_steps=2,
                    optim__grad_clip=0.0, optim__weight_decay=0.1)
    for name in ("norm", "bias"):  # decay everything: what optax's schedule_free_adamw does
        c.optim.groups[name].weight_decay = -1.0
    params = tiny_params(scan_layers=False)
    grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
    ours = optim.make(c.optim, 6)
    theirs = optax.contrib.schedule_free_adamw(optim.schedule(c.optim, 6), b1=c.optim.b1, b2=c.optim.b2,
                                               eps=c.optim.eps, weight_decay=0.1)
    states, steps = [ours.init(params), theirs.init(params)], [jax.jit(ours.update), jax.jit(theirs.update)]
    for _ in range(3):
        (a, states[0]), (b, states[1]) = (step(grads, state, params) for step, state in zip(steps, states))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    assert optim.eval_params(c.optim, states[0], params) is not params
    assert optim.eval_params(tiny_config().optim, states[0], params) is params  # identity for the others


@pytest.mark.parametrize("overrides, field, message", [
    (dict(optim__name="adagrad"), "optim.name", "is not a known choice.*'adamw', 'adam', 'sgd', 'adafactor', 'lion', "
                                                "'muon', 'schedule_free_adamw'"),
    (dict(optim__name="schedule_free_adamw"), "optim.schedule", "does not suit.*schedule=constant"),
    (dict(optim__name="schedule_free_adamw", optim__schedule="constant", optim__b1=0.0), "optim.b1", "b1 > 0"),
    (dict(optim__sgd__momentum=1.0), "optim.sgd.momentum", r"must lie in \[0, 1\)"),
    (dict(optim__groups__embedding__lr_scale=-0.5), "optim.groups.embedding.lr_scale", "must be zero or positive"),
    (dict(optim__groups__norm__weight_decay=-0.5), "optim.groups.norm.weight_decay", "Fix"),
    (dict(optim__eps=0.0), "optim.eps", r"must be positive\. Fix: set a value > 0"),
    (dict(optim__eps=-1.0), "optim.eps", "must be positive"),
    (dict(optim__name="muon", optim__muon__ns_steps=1000), "optim.muon.ns_steps", r"at most 20.*Fix: use 5"),
])
def test_bad_optimizer_settings_name_the_field_and_the_fix(overrides, field, message):
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{re.escape(field)}=.*{message}"):
        config_lib.validate(tiny_config(**overrides))


def test_schedule_free_evaluates_samples_and_exports_its_averaged_parameters(tmp_path):
    config = tiny_config(optim__name="schedule_free_adamw", optim__schedule="constant", optim__lr=1e-2,
                         train__steps=4, sample__max_new_tokens=2)
    final = loop.train_and_evaluate(config, str(tmp_path))
    checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    loaded = artifacts.load(str(tmp_path), eval_params=optim.eval_params_reader)
    abstract_opt_state, _ = optim.eval_params_reader(config, loaded.params)
    raw, opt_state = checkpointer.restore_params_and_opt_state(4, loaded.params, abstract_opt_state)
    checkpointer.close()
    averaged = optax.contrib.schedule_free_eval_params(opt_state[-1], raw)  # optax's own, on the saved state
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(averaged), strict=True):
        np.testing.assert_array_equal(got, want)

    run = setup.setup_run(config, str(tmp_path))
    try:
        on_average, on_raw = run.eval_metrics(averaged)["loss"], run.eval_metrics(raw)["loss"]
    finally:
        run.close()
    assert final["loss"] == pytest.approx(on_average, rel=1e-6)  # the run's own evaluation used the average
    assert abs(on_raw - on_average) > 1e-3  # ... which is not the raw iterate's
    with pytest.raises(ValueError, match="raw iterate.*eval_params"):
        artifacts.load(str(tmp_path))  # a reader that forgets the average is stopped
    artifacts.export(str(tmp_path), str(tmp_path / "export"), eval_params=optim.eval_params_reader)
    for got, want in zip(jax.tree.leaves(artifacts.load(str(tmp_path / "export")).params), jax.tree.leaves(averaged),
                         strict=True):
        np.testing.assert_array_equal(got, want)
