"""µP (lm.model.mup): its config checks, what its multipliers scale, equality with the
standard model at the base width, the Hugging Face export's folds, and its benches."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import REPO, cli_env, tiny_config

from lm import config as config_lib
from lm import convert
from lm.config import choices
from lm.data import corpora, tokenizers
from lm.inference import decode
from lm.inference.sampling import Sampling
from lm.interop import huggingface
from lm.model import ModelConfig, build, mup
from lm.runs import artifacts
from lm.training import optim

VOCAB, LENGTH = 50, 8
TOKENS_BL = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)), jnp.int32)


def model_cfg(parametrization="mup", d_model=32, base=32, **fields) -> ModelConfig:
    fields = dict(dict(num_layers=2, num_heads=2, positions="rope"), **fields)
    config = tiny_config(model__d_model=d_model, model__parametrization=parametrization,
                         model__mup_base_width=base if parametrization == "mup" else 0,
                         **{f"model__{k}": v for k, v in fields.items()})
    return ModelConfig.from_config(config.model, VOCAB, LENGTH, platform="cpu")


def init(cfg: ModelConfig) -> dict:
    return jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(build(cfg).init)(jax.random.key(0), TOKENS_BL)["params"]))


def logits(cfg: ModelConfig, params: dict, return_hidden: bool = False) -> np.ndarray:
    apply = jax.jit(lambda p: build(cfg).apply({"params": p}, TOKENS_BL, return_hidden=return_hidden))
    return np.asarray(apply(params))


def test_mup_without_a_base_width_or_with_an_unknown_name_is_one_error_naming_the_field():
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.mup_base_width=0 must be set when "
                       r"model\.parametrization='mup'.*Fix: set --config\.model\.mup_base_width"):
        config_lib.validate(tiny_config(model__parametrization="mup"))
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.parametrization='mu' is not a known choice\. "
                       r"Fix: use one of 'standard', 'mup'"):
        config_lib.validate(tiny_config(model__parametrization="mu"))
    config_lib.validate(tiny_config(model__parametrization="mup", model__mup_base_width=16))


def test_a_resumed_run_may_not_change_the_parametrization_or_the_base_width():
    saved = json.loads(tiny_config().to_json_best_effort())
    new = json.loads(tiny_config(model__parametrization="mup", model__mup_base_width=16).to_json_best_effort())
    conflicts = config_lib.resume_conflicts(saved, new)
    assert [c.split(" was ")[0] for c in conflicts] == ["config.model.mup_base_width", "config.model.parametrization"]
    wider = json.loads(tiny_config(model__parametrization="mup", model__mup_base_width=32).to_json_best_effort())
    assert [c.split(" was ")[0] for c in config_lib.resume_conflicts(new, wider)] == ["config.model.mup_base_width"]


def test_a_base_width_without_mup_means_nothing_so_a_resumed_standard_run_may_drop_or_change_it():
    saved = json.loads(tiny_config(model__mup_base_width=64).to_json_best_effort())
    for width in (0, 16):
        assert config_lib.resume_conflicts(saved, json.loads(tiny_config(model__mup_base_width=width)
                                                              .to_json_best_effort())) == []


def test_at_the_base_width_mup_is_the_standard_model_with_queries_scaled_by_one_over_sqrt_head_dim():
    standard, mup_cfg = model_cfg("standard"), model_cfg("mup")
    params = init(mup_cfg)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, init(standard)))  # the same init at m = 1
    assert not np.allclose(logits(mup_cfg, params), logits(standard, params), atol=1e-4)  # attention 1/d
    scaled = jax.tree.map(np.array, params)
    for i in range(2):  # the q slice of the fused kernel [D, 3, H, K], times 1/sqrt(K)
        scaled[f"layer_{i}"]["attn"]["qkv"]["kernel"][:, 0] /= np.sqrt(mup_cfg.head_dim)
    np.testing.assert_allclose(logits(mup_cfg, params), logits(standard, scaled), rtol=1e-5, atol=1e-5)


def test_hidden_init_std_scales_as_one_over_sqrt_m_and_embeddings_keep_theirs():
    narrow, wide = init(model_cfg(d_model=64, base=64)), init(model_cfg(d_model=256, base=64))  # m = 1 and 4
    std = lambda params, *path: float(np.std(_get(params, path)))
    for path in (("layer_0", "attn", "qkv", "kernel"), ("layer_0", "mlp", "wi", "kernel"),
                 ("layer_1", "attn", "out", "kernel"), ("layer_1", "mlp", "wo", "kernel")):
        assert std(wide, *path) / std(narrow, *path) == pytest.approx(0.5, rel=0.05), path
    assert std(narrow, "layer_0", "mlp", "wo", "kernel") == pytest.approx(0.02 / 2, rel=0.05)  # GPT-2's 1/sqrt(2L)
    assert std(wide, "embed", "embedding") == pytest.approx(0.02, rel=0.05)
    assert std(narrow, "embed", "embedding") == pytest.approx(0.02, rel=0.05)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("tie", [True, False])
def test_logits_are_the_head_output_times_one_over_m(tie):
    cfg = model_cfg(d_model=64, base=16, tie_embeddings=tie)  # m = 4
    params = init(cfg)
    hidden_BLD = logits(cfg, params, return_hidden=True)
    head_DV = params["embed"]["embedding"].T if tie else params["unembed"]["kernel"]
    np.testing.assert_allclose(logits(cfg, params), hidden_BLD @ np.asarray(head_DV) / 4, rtol=1e-5, atol=1e-6)
    if not tie:  # an untied head starts as the embedding does
        assert np.std(params["unembed"]["kernel"]) == pytest.approx(0.02, rel=0.1)


def test_every_optimizer_with_a_mup_rate_rule_validates_under_mup_and_sgd_without_one_is_refused_naming_them():
    assert set(choices.MUP_RATE_EXPONENTS) == set(choices.OPTIMIZERS) - {"sgd"}
    for name in choices.MUP_RATE_EXPONENTS:
        config_lib.validate(tiny_config(model__parametrization="mup", model__mup_base_width=16, optim__name=name,
                                        optim__schedule="constant"))
        assert mup.lr_multipliers(model_cfg("standard"), name) == {}
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.name='sgd' has no µP learning-rate rule.*"
                       r"'adamw', 'adam', 'lion', 'schedule_free_adamw', 'muon', 'adafactor'"):
        config_lib.validate(tiny_config(model__parametrization="mup", model__mup_base_width=32, optim__name="sgd"))


# With m = 4: each group's first update under µP over the same update without multipliers
# (lm.model.mup's rules: Adam's hidden 1/m, Muon's none, Adafactor's hidden 1/sqrt(m)).
FIRST_STEP_RATIOS = {
    "adamw": {"matrix": 0.25, "embedding": 1.0, "head": 1.0, "norm": 1.0},
    "lion": {"matrix": 0.25, "embedding": 1.0, "head": 1.0, "norm": 1.0},
    "muon": {"matrix": 1.0, "embedding": 1.0, "head": 1.0, "norm": 1.0},
    "adafactor": {"matrix": 0.5, "embedding": 1.0, "head": 1.0, "norm": 1.0},
}
GROUP_PATHS = {"matrix": [("layer_0", "attn", "qkv", "kernel"), ("layer_1", "mlp", "wo", "kernel")],
               "embedding": [("embed", "embedding")], "head": [("unembed", "kernel")],
               "norm": [("final_norm", "scale")]}


@pytest.mark.parametrize("name", sorted(FIRST_STEP_RATIOS))
def test_each_groups_first_step_scales_by_its_optimizers_mup_rule_through_the_real_optimizer(name):
    config = tiny_config(model__d_model=64, model__parametrization="mup", model__mup_base_width=16,
                         optim__schedule="constant", optim__warmup_steps=0, model__tie_embeddings=False,
                         optim__name=name, optim__weight_decay=0.0)
    cfg = ModelConfig.from_config(config.model, VOCAB, LENGTH, platform="cpu")
    ratios = first_update_ratios(config, cfg, init(cfg), gradient=0.01)
    for group, expected in FIRST_STEP_RATIOS[name].items():
        for path in GROUP_PATHS[group]:
            assert _get(ratios, path) == pytest.approx(expected, rel=1e-5), (group, path)


def first_update_ratios(config, cfg, params, gradient: float):
    """Each parameter's first update under µP's multipliers over its update without them,
    from a gradient of `gradient` everywhere."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, gradient), params)

    def first_update(multipliers):
        optimizer = optim.make(config.optim, config.train.steps, multipliers)
        return jax.jit(lambda g, p: optimizer.update(g, optimizer.init(p), p)[0])(grads, params)  # eager is slow

    scaled, plain = first_update(mup.lr_multipliers(cfg, config.optim.name)), first_update({})
    return jax.tree.map(lambda a, b: float(np.mean(np.asarray(a) / np.asarray(b))), scaled, plain)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "schedule_free_adamw"])
def test_under_mup_each_groups_weight_decay_per_step_is_the_base_widths(name):
    # With no gradient the first update is the decay alone, -rate x decay x p: under µP the
    # hidden matrices' rate is m^e times the base's and their decay 1 / m^e times, as the
    # mup package's MuAdamW has it, so the decay per step does not shrink with width.
    config = tiny_config(model__d_model=64, model__parametrization="mup", model__mup_base_width=16,
                         optim__schedule="constant", optim__warmup_steps=0, model__tie_embeddings=False,
                         optim__name=name, optim__weight_decay=0.1)
    cfg = ModelConfig.from_config(config.model, VOCAB, LENGTH, platform="cpu")
    assert mup.lr_multipliers(cfg, name)["matrix"] < 1  # the rule does scale the matrices' rate
    ratios = first_update_ratios(config, cfg, init(cfg), gradient=0.0)
    for group in ("matrix", "embedding", "head"):
        for path in GROUP_PATHS[group]:
            assert _get(ratios, path) == pytest.approx(1.0, rel=1e-5), (group, path)


HF_SHAPED = [
    dict(positions="learned", norm="layernorm", activation="gelu_tanh", use_bias=True),  # GPT-2: fused, tied
    dict(positions="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=1, tie_embeddings=False),  # LLaMA
]


def perturbed(params: dict) -> dict:
    """`params` plus noise: random norms and biases, so a missed fold cannot hide."""
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32), params)


@pytest.mark.parametrize("fields", HF_SHAPED)
def test_the_hugging_face_export_folds_mup_into_weights_of_a_standard_model_with_the_same_logits(fields):
    mup_cfg = model_cfg(d_model=64, base=16, **fields)
    params = perturbed(init(mup_cfg))
    model = ml_collections.ConfigDict(dataclasses.asdict(mup_cfg))  # as lm.convert.export_hf reads it
    arch = huggingface.exportable_architecture(model)
    before = jax.tree.map(np.copy, params)
    folded = huggingface.fold_mup(params, model)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, before))  # the fold copies
    assert not np.array_equal(folded["final_norm"]["scale"], params["final_norm"]["scale"])
    tensors = huggingface.to_hf_tensors(arch.rules(model, VOCAB), folded)
    standard = dataclasses.replace(mup_cfg, parametrization="standard", mup_base_width=0)
    back = huggingface.to_lm_params(arch.rules(model, VOCAB), tensors, init(standard))
    np.testing.assert_allclose(logits(standard, back), logits(mup_cfg, params), rtol=1e-4, atol=1e-5)
    model.parametrization = "standard"
    assert huggingface.fold_mup(params, model) is params


def test_cached_decoding_and_an_export_give_the_training_forwards_logits(tmp_path):
    cfg = dataclasses.replace(model_cfg(d_model=64, base=16, num_kv_heads=1), max_len=16)  # m = 4, grouped kv
    model, params = build(cfg), jax.tree.map(lambda p: p * 4 if p.ndim >= 2 else p, init(cfg))
    prompt_BP = TOKENS_BL[:1, :4]
    tokens_BP, valid_BP, positions_BP = decode.left_pad([np.asarray(prompt_BP[0])], pad_id=0)
    new_BT, logits_BTV = decode.generate_cached(model, params, tokens_BP, valid_BP, positions_BP, jax.random.key(0),
                                                max_new_tokens=6, sampling=Sampling(temperature=0.0))
    sequence_BL = jnp.concatenate([prompt_BP, new_BT], axis=1)
    full_BLV = jax.jit(model.apply)({"params": params}, sequence_BL)
    np.testing.assert_allclose(logits_BTV[0], full_BLV[0, 3:-1], atol=1e-5, rtol=0)

    config = tiny_config(model__d_model=64, model__parametrization="mup", model__mup_base_width=16,
                         model__num_kv_heads=1, data__seq_len=16)
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        tokenizer = tokenizers.CharTokenizer.train([f.read()])
    run_cfg = ModelConfig.for_run(config, tokenizer.vocab_size)
    params = jax.tree.map(lambda p: p * 4 if p.ndim >= 2 else p, init(run_cfg))
    artifacts.write_export(str(tmp_path / "export"), params, config, tokenizer,
                           {"step": 0, "dtype": "float32", "parameters": 0})
    loaded = artifacts.load(str(tmp_path / "export"))
    assert loaded.model_cfg.parametrization == "mup" and loaded.model_cfg.logit_scale == 0.25
    np.testing.assert_array_equal(jax.jit(loaded.model.apply)({"params": loaded.params}, TOKENS_BL),
                                  logits(run_cfg, params))


@pytest.mark.interop
@pytest.mark.parametrize("fields", HF_SHAPED)
def test_transformers_gives_an_exported_mup_models_logits(fields, tmp_path):
    from tests.hf_models import hf_logits, lm_logits, require_interop, transformers

    require_interop()
    config = tiny_config(model__d_model=64, model__parametrization="mup", model__mup_base_width=16,
                         data__seq_len=16, **{f"model__{k}": v for k, v in fields.items()})
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        tokenizer = tokenizers.CharTokenizer.train([f.read()])
    run_cfg = ModelConfig.for_run(config, tokenizer.vocab_size)
    artifacts.write_export(str(tmp_path / "lm"), perturbed(init(run_cfg)), config, tokenizer,
                           {"step": 0, "dtype": "float32", "parameters": 0})
    convert.export_hf(str(tmp_path / "lm"), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens_BL = np.asarray(TOKENS_BL)
    np.testing.assert_allclose(hf_logits(model, tokens_BL), lm_logits(str(tmp_path / "lm"), tokens_BL),
                               rtol=1e-4, atol=1e-4)


def test_the_start_up_line_names_the_optimizer_schedule_and_mu_p_base_width():
    from lm.training import loop  # its line is checked as printed in test_end_to_end.py

    assert loop.describe_training(tiny_config()) == "optimizer adamw (cosine, lr 0.001)"  # no µP clause
    config = tiny_config(model__parametrization="mup", model__mup_base_width=16, optim__name="lion",
                         optim__schedule="wsd", optim__lr=3e-4)
    assert loop.describe_training(config) == "optimizer lion (wsd, lr 0.0003), µP (base width 16, m 2)"


@pytest.mark.bench
def test_the_coordinate_check_prints_each_parametrizations_table_and_the_verdict():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "mup_coord_check.py"), "--widths=16,32",
                             "--base_width=16", "--steps=2", "--layers=1", "--heads=2", "--seq_len=16"],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for title in ("standard, after step 2", "mup, after step 2", "mup, after step 1"):
        assert title in out, out
    assert "| layer_0/attention |" in out and "| logits |" in out
    figures = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))
    assert float(figures["standard_max_ratio"].split()[0]) >= 1.0
    assert figures["mup_every_layer_within_2x"] in ("yes", "no")


@pytest.mark.parametrize("bad, flag", [(["--widths=64,130"], "--heads=4"), (["--base_width=0"], "--base_width=0"),
                                       (["--heads=3", "--widths=32,64"], "--heads=3"), (["--widths=abc"], "'abc'")])
def test_a_bad_coordinate_check_flag_is_one_line_naming_the_benchs_flag_and_exits_2(bad, flag):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "mup_coord_check.py"), "--steps=1", *bad],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lm: error: "), result.stderr
    assert flag in lines[0] and "Fix:" in lines[0] and "--config." not in lines[0], lines[0]


def test_the_lr_transfer_sweep_covers_both_widths_at_rates_2x_apart_and_the_bench_finds_each_best():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import mup_lr_transfer

    from lm.configs.scaling import shakespeare_mup

    points = shakespeare_mup.get_sweep("mup")
    rates = sorted({p["optim.lr"] for p in points})
    assert len(rates) >= 5 and all(b == 2 * a for a, b in zip(rates, rates[1:]))
    assert {p["model.d_model"] for p in points} == {128, 512}
    assert shakespeare_mup.get_config("mup,20").model.mup_base_width == 128
    config_lib.validate(shakespeare_mup.get_config("standard,20"))
    losses = {(0.001, 128): 2.0, (0.002, 128): 1.9, (0.001, 512): 1.8, (0.002, 512): float("nan")}
    assert mup_lr_transfer.best_rates(losses) == {128: 0.002, 512: 0.001}
    assert "1.9000 *" in "\n".join(mup_lr_transfer.table("mup", losses))
