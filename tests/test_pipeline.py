"""Pipeline parallelism (issue 24): a `stage` mesh axis composes with data, FSDP and tensor
axes and trains like one device; the compiled schedule loops M R + S - 1 times and the log
prints its bubble; checkpoints restore across stage layouts; bad pipelines fail in one
message naming the field."""

import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import tiny_config
from test_resume_optimizers import logged
from test_train import STREAM, train_three_steps

from lm import objectives
from lm.config import validation
from lm.data import batches, rows
from lm.model import ModelConfig, pipeline
from lm.model.layers import remat_policy
from lm.model.pipeline import PipelineError
from lm.parallel import sharding
from lm.runs import artifacts, checkpoint
from lm.training import loop
from lm.training.step import apply
from lm.training.trainer import make_trainer

PIPELINE = dict(model__num_layers=4, model__scan_layers=True, model__num_heads=4, train__microbatches=4,
                eval__batch_size=16)
ONE_DEVICE = dict(stage=1, data=1, fsdp=1, tensor=1)
LAYOUTS = {  # name -> (mesh shape on 8 devices, pipeline repeats, remat policy)
    "stage4_data2": (dict(stage=4, data=2, fsdp=1, tensor=1), 1, "none"),
    "stage2_fsdp2_tensor2_remat": (dict(stage=2, data=1, fsdp=2, tensor=2), 1, "dots_with_no_batch_dims_saveable"),
    "stage2_circular2_data4_remat": (dict(stage=2, data=4, fsdp=1, tensor=1), 2, "full"),
}


def trainer_for(mesh_shape: dict, devices, repeats: int = 1, vocab_size: int = 64, **overrides):
    config = tiny_config(**{"train__batch_size": 16, **PIPELINE, "mesh__pipeline_repeats": repeats, **overrides})
    config.mesh.shape.update(mesh_shape)
    mesh = sharding.make_mesh(config, devices)
    sharding.check_batch_sizes(config, mesh)
    model_cfg = ModelConfig.from_config(config.model, vocab_size + config.objective.extra_ids, config.data.seq_len)
    return config, make_trainer(config, model_cfg, mesh, pad_id=0)


def loss_and_gradients(mesh_shape: dict, devices, repeats: int = 1, **overrides):
    """The first batch's loss and gradients at the initial parameters."""
    config, trainer = trainer_for(mesh_shape, devices, repeats, **overrides)
    data = batches.per_process(rows.train_rows(STREAM, config.data.seq_len, seed=0), config.train.batch_size)
    batch = batches.to_global(data[0], trainer.batch_sharding)
    make_example = objectives.for_config(config.objective, config.model.family, 0, 64)

    def loss(params):
        example = make_example(batch, jax.random.key(0))
        total, weight = objectives.weighted_cross_entropy(apply(trainer.model, params, example),
                                                          example.targets_BL, example.weights_BL)
        return total / weight

    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        return jax.jit(jax.value_and_grad(loss))(trainer.init().params)


@pytest.fixture(scope="module")
def one_device():
    """Three steps' losses (the 4 microbatches accumulated) and the first gradients on one device."""
    return (train_three_steps(ONE_DEVICE, jax.devices()[:1], **PIPELINE)[0],
            loss_and_gradients(ONE_DEVICE, jax.devices()[:1]))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.keys())
def test_each_pipeline_layout_trains_like_one_device(one_device, layout):
    mesh_shape, repeats, remat = LAYOUTS[layout]
    losses, state = train_three_steps(mesh_shape, jax.devices(), **PIPELINE, mesh__pipeline_repeats=repeats,
                                      model__remat=remat)
    np.testing.assert_allclose(losses, one_device[0], rtol=0, atol=1e-5)
    loss, grads = loss_and_gradients(mesh_shape, jax.devices(), repeats, model__remat=remat)
    np.testing.assert_allclose(loss, one_device[1][0], rtol=0, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(one_device[1][1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)  # test_model's scan-vs-loop tolerance
    kernel = state.params["layers"]["mlp"]["wi"]["kernel"]  # [layers, embed, mlp]: stage s holds 4/S layers
    assert kernel.sharding.spec[0] == "stage"
    assert kernel.addressable_shards[0].data.shape[0] == 4 // mesh_shape["stage"]


def test_parameter_groups_and_muon_stay_right_with_layers_on_the_stage_axis():
    """Muon on the hidden matrices (the stacked kernels' layer axis a batch of matrices) and
    AdamW groups with their own rates and decay train as on one device."""
    groups = dict(optim__name="muon", optim__groups__embedding__lr_scale=0.5,
                  optim__groups__norm__weight_decay=0.01, optim__groups__matrix__weight_decay=0.2)
    single = train_three_steps(ONE_DEVICE, jax.devices()[:1], **PIPELINE, **groups)
    staged = train_three_steps(dict(stage=2, data=4, fsdp=1, tensor=1), jax.devices(), **PIPELINE, **groups)
    np.testing.assert_allclose(staged[0], single[0], rtol=0, atol=1e-5)
    params, opt_state = staged[1].params, staged[1].opt_state
    kernel = params["layers"]["attn"]["qkv"]["kernel"]
    states = [x for x in jax.tree.leaves(opt_state) if getattr(x, "shape", None) == kernel.shape]
    assert states and all(x.sharding == kernel.sharding for x in states)  # moments live with their layers


def test_the_encoder_family_pipelines_too():
    encoder = dict(model__family="encoder", objective__name="masked_lm", objective__extra_ids=1)
    single = train_three_steps(ONE_DEVICE, jax.devices()[:1], **PIPELINE, **encoder)[0]
    staged = train_three_steps(dict(stage=2, data=4, fsdp=1, tensor=1), jax.devices(), **PIPELINE, **encoder)[0]
    np.testing.assert_allclose(staged, single, rtol=0, atol=1e-5)


def test_outside_the_pipeline_each_stage_computes_the_head_for_its_share_of_the_rows():
    config, trainer = trainer_for(dict(stage=2, data=1, fsdp=4, tensor=1), jax.devices(), vocab_size=997)
    assert dict(trainer.rules)["batch"] == ("stage", "data", "fsdp")
    text = trainer.compile_step(config.train.batch_size, config.data.seq_len).as_text()
    rows = {int(r) for r in re.findall(rf"f32\[(\d+),{config.data.seq_len},997\]", text)}  # [rows, L, V] logits
    assert max(rows) == 16 // 8, rows  # 16 rows over 2 stages x 4 fsdp shards, never all 4 of an fsdp shard


def test_in_a_pipeline_the_no_batch_dims_remat_policy_still_saves_the_weight_matmuls():
    """Inside the vmap over stages every matmul has the stage axis as a batch dimension, so
    JAX's dots_with_no_batch_dims_saveable would save none (full remat, silently)."""
    def layer(x_LD, w_DF):
        scores_LL = jnp.einsum("ld,md->lm", x_LD, x_LD)  # no batch dimension before the vmap
        heads_HLL = jnp.einsum("hld,hmd->hlm", x_LD[None], x_LD[None])  # one: like attention's heads
        return x_LD @ w_DF, scores_LL, heads_HLL

    x_SLD, w_SDF = jnp.ones((2, 4, 8)), jnp.ones((2, 8, 16))
    dots = [e for e in jax.make_jaxpr(jax.vmap(layer))(x_SLD, w_SDF).eqns if e.primitive is jax.lax.dot_general_p]
    saved = lambda policy: {e.outvars[0].aval.shape: policy(e.primitive, *[v.aval for v in e.invars], **e.params)
                            for e in dots}
    weights, scores, heads = (2, 4, 16), (2, 4, 4), (2, 1, 4, 4)
    assert saved(jax.checkpoint_policies.dots_with_no_batch_dims_saveable) == {weights: False, scores: False,
                                                                              heads: False}
    assert saved(remat_policy("dots_with_no_batch_dims_saveable", pipelined=True)) == {weights: True, scores: True,
                                                                                      heads: False}
    assert remat_policy("dots_with_no_batch_dims_saveable", pipelined=False) is \
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def compiled_trip_counts(text: str) -> set[int]:
    return {int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text)}


@pytest.mark.parametrize("stages,repeats,microbatches", [(4, 1, 4), (2, 2, 8)])
def test_the_compiled_step_loops_m_r_plus_s_minus_1_times_and_the_log_prints_that_bubble(
        stages, repeats, microbatches, tmp_path, capsys):
    shape = dict(stage=stages, data=8 // stages, fsdp=1, tensor=1)
    overrides = dict(model__num_layers=8, train__microbatches=microbatches, train__batch_size=8 * microbatches,
                     eval__batch_size=8 * microbatches)
    config, trainer = trainer_for(shape, jax.devices(), repeats, **overrides)
    trips = compiled_trip_counts(trainer.compile_step(config.train.batch_size, config.data.seq_len).as_text())
    schedule = microbatches * repeats + stages - 1
    assert schedule in trips  # the pipeline's loop (forward, and its transpose backward)
    assert trips <= {schedule, 8 // (stages * repeats)}  # else only each stage's scan over its layers

    config = tiny_config(**{**PIPELINE, **overrides}, mesh__pipeline_repeats=repeats, train__steps=3,
                         eval__num_batches=1, sample__max_new_tokens=4)  # the sample decodes layer by layer
    config.mesh.shape.update(shape)
    loop.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "--- sample (step 3) ---" in out
    line = re.search(r"pipeline: (\d+) stages .*, (\d+) microbatches: (\d+) iterations a step, bubble fraction "
                     r"([\d.]+)", out)
    assert line, "no pipeline line in the log"
    assert [int(x) for x in line.groups()[:3]] == [stages, microbatches, schedule]
    assert float(line.group(4)) == pytest.approx((stages - 1) / schedule, abs=5e-5)
    assert float(line.group(4)) == pytest.approx(pipeline.bubble_fraction(stages, microbatches, repeats), abs=5e-5)


@pytest.mark.slow
def test_a_checkpoint_saved_with_4_stages_restores_with_1_and_2_bit_for_bit_and_trains_on_alike(tmp_path):
    steps, every = 6, 3
    settings = dict(**PIPELINE, train__steps=steps, train__log_every=1, train__checkpoint_every=every,
                    train__keep_checkpoints=2, eval__num_batches=1, sample__max_new_tokens=0)

    micro = {4: 4, 2: 2, 1: 1}  # TINY's batch of 8 over data=8 // stages: one row a slice

    def run(workdir, stages: int):
        config = tiny_config(**{**settings, "train__microbatches": micro[stages]})
        config.mesh.shape.update(dict(stage=stages, data=-1, fsdp=1, tensor=1))
        loop.train_and_evaluate(config, str(workdir))
        return config

    four = tmp_path / "stage4"
    run(four, 4)
    saved = ocp.StandardCheckpointer().restore(str(four / "checkpoints" / str(every) / "state"))["params"]
    original = {step: loss for step, loss, _ in logged(four)}
    for stages in (1, 2):
        workdir = tmp_path / f"stage{stages}"
        shutil.copytree(four, workdir)
        shutil.rmtree(workdir / "checkpoints" / str(steps))  # resume from the checkpoint at 3
        config, trainer = trainer_for(dict(stage=stages, data=8 // stages, fsdp=1, tensor=1), jax.devices(),
                                      vocab_size=artifacts.load_tokenizer(str(four)).vocab_size,
                                      train__microbatches=micro[stages])
        reader = checkpoint.Checkpointer(str(workdir / "checkpoints"), read_only=True)
        restored = reader.restore_state(every, trainer.abstract_state())
        reader.close()
        for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit for bit onto the new layout
        run(workdir, stages)
        resumed = {step: loss for step, loss, _ in logged(workdir)[steps:]}
        assert sorted(resumed) == list(range(every + 1, steps + 1))
        np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                                   [original[s] for s in sorted(resumed)], rtol=1e-5, atol=0)


@pytest.mark.parametrize("overrides,message", [
    (dict(model__num_layers=6, mesh__pipeline_repeats=2),
     r"config\.model\.num_layers=6 does not split into 2 stages .* x 2 repeats .* Fix: a layer count that is a "
     r"multiple of 4"),
    (dict(train__microbatches=1), r"config\.train\.microbatches=1 is fewer than the 2 pipeline stages "
                                  r"\(config\.mesh\.shape\.stage x config\.mesh\.dcn_shape\.stage\).* Fix: "
                                  r"train\.microbatches >= 2"),
    (dict(train__microbatches=3, train__batch_size=24, eval__batch_size=24),
     r"config\.train\.microbatches=3 is not a multiple of the 2 pipeline stages .* Fix: train\.microbatches=4 or 2"),
    (dict(model__family="encoder_decoder", objective__name="span_corruption", objective__extra_ids=4),
     r"2 pipeline stages .*: the encoder_decoder family has no pipeline .* Fix: mesh\.shape\.stage=1"),
    (dict(model__scan_layers=False), r"2 pipeline stages .* need config\.model\.scan_layers=True"),
    (dict(eval__batch_size=12), r"config\.eval\.batch_size=12 is not a multiple of config\.train\.microbatches=4 "
                                r"x the 4 batch shards .* = 16: evaluation runs through the pipeline's microbatches"),
])
def test_a_pipeline_that_cannot_run_fails_before_compiling_with_one_message_naming_the_field(overrides, message):
    with pytest.raises(sharding.MeshError if "eval" in message else PipelineError, match=message):
        trainer_for(dict(stage=2, data=4, fsdp=1, tensor=1), jax.devices(), **overrides)


def test_pipeline_repeats_without_stages_is_refused():
    with pytest.raises(PipelineError, match=r"config\.mesh\.pipeline_repeats=2 needs a pipeline, but "
                                            r"config\.mesh\.shape\.stage=1"):
        trainer_for(dict(stage=1, data=8, fsdp=1, tensor=1), jax.devices(), repeats=2)


def test_a_config_written_before_stages_existed_still_validates_and_has_one_stage():
    config = tiny_config()
    config.mesh.shape = dict(data=2, fsdp=4, tensor=1)  # the three axes of older configs
    config.mesh.dcn_shape = dict(data=1, fsdp=1, tensor=1)
    validation.validate(config)
    assert dict(sharding.make_mesh(config, jax.devices()).shape) == dict(stage=1, data=2, fsdp=4, tensor=1)


def test_a_length_rule_that_does_not_divide_the_input_rows_fails_before_anything_is_written():
    config = tiny_config(**PIPELINE)  # rows of seq_len + 1 = 17 tokens
    config.sharding.rules = tuple((name, "tensor" if name == "length" else axes)
                                  for name, axes in config.sharding.rules)
    config.mesh.shape.update(dict(stage=1, data=4, fsdp=1, tensor=2))
    with pytest.raises(sharding.MeshError, match=r"config.sharding.rules map 'length' to \('tensor',\) \(2 devices\), "
                                                 r"which does not divide the batch's rows of data.seq_len \+ 1 = 17 "
                                                 r"tokens .* Fix: the rule \('length', None\)"):
        sharding.check_batch_sizes(config, sharding.make_mesh(config, jax.devices()))


def test_a_pipeline_whose_rules_keep_layers_off_the_stage_axis_is_warned_about(caplog):
    config = tiny_config(**PIPELINE, train__batch_size=16)
    config.sharding.rules = tuple((name, None if name == "layers" else axes) for name, axes in config.sharding.rules)
    config.mesh.shape.update(dict(stage=2, data=4, fsdp=1, tensor=1))
    sharding.check_batch_sizes(config, sharding.make_mesh(config, jax.devices()))
    assert "does not map 'layers' to 'stage': every one of the 2 pipeline stages holds every layer" in caplog.text
