"""The train step: one code path for 1 device and 8, with the same losses."""

import jax
import numpy as np
import pytest
from helpers import run_cli, tiny_config

from lm import objectives
from lm.data import batches, rows
from lm.model import ModelConfig
from lm.parallel import sharding
from lm.training.step import TrainState, microbatch_slices
from lm.training.trainer import evaluate, make_trainer

STREAM = np.arange(3, 20_003, dtype=np.int32) % 60 + 3


def train_three_steps(mesh_shape: dict, devices, **overrides) -> tuple[list[float], TrainState]:
    config = tiny_config(**{"train__batch_size": 16, **overrides})
    config.mesh.shape.update(mesh_shape)
    mesh = sharding.make_mesh(config, devices)
    sharding.check_batch_sizes(config, mesh)
    model_cfg = ModelConfig.from_config(config.model, 64 + config.objective.extra_ids, config.data.seq_len)
    trainer = make_trainer(config, model_cfg, mesh, pad_id=0)
    state = trainer.init()
    data = batches.per_process(rows.train_rows(STREAM, config.data.seq_len, seed=0), config.train.batch_size)
    losses = []
    for step in range(3):
        state, metrics = trainer.step(state, batches.to_global(data[step], trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return losses, state


def three_step_losses(mesh_shape: dict, devices, **overrides) -> list[float]:
    return train_three_steps(mesh_shape, devices, **overrides)[0]


VARIANTS = {  # objectives and model options beyond the default causal GPT
    "prefix_lm_zloss_gqa_scan_remat": dict(objective__name="prefix_lm", objective__z_loss=1e-4, model__num_heads=4,
                                           model__num_kv_heads=2, model__scan_layers=True,
                                           model__remat="dots_saveable"),
    "encoder_masked_lm": dict(model__family="encoder", objective__name="masked_lm", objective__extra_ids=1),
    "t5_span_corruption": dict(model__family="encoder_decoder", objective__name="span_corruption",
                               objective__extra_ids=4, model__positions="rope", model__scan_layers=True),
    "t5_ul2_mixture": dict(model__family="encoder_decoder", objective__name="mixture", objective__extra_ids=8,
                           model__positions="rope", model__scan_layers=True),
    "decoder_ul2_mixture": dict(objective__name="mixture", objective__extra_ids=8, model__scan_layers=True),
}


@pytest.mark.families  # `pytest -m families`: about 3 minutes, over CI's budget
@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_every_objective_and_model_option_trains_the_same_on_8_devices_as_on_one(variant):
    single = three_step_losses(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], **variant)
    sharded = three_step_losses(dict(data=2, fsdp=4, tensor=1), jax.devices(), **variant)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    assert sharded[2] < sharded[0]


def test_causal_objective_shifts_targets_and_puts_no_weight_on_padding():
    tokens = np.array([[5, 6, 7, 0, 0]], np.int32)
    example = objectives.causal_lm({"tokens": tokens}, pad_id=0)
    assert example.inputs_BL.tolist() == [[5, 6, 7, 0]]
    assert example.targets_BL.tolist() == [[6, 7, 0, 0]]
    assert example.weights_BL.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_causal_objective_on_packed_rows_predicts_nothing_across_documents():
    batch = {"tokens": np.array([[5, 6, 1, 8, 9, 1, 0, 0]], np.int32),  # two documents + <eos>, padding
             "segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32),
             "positions": np.array([[0, 1, 2, 0, 1, 2, 0, 0]], np.int32)}
    example = objectives.causal_lm(batch, pad_id=0)
    assert example.targets_BL.tolist() == [[6, 1, 8, 9, 1, 0, 0]]
    assert example.weights_BL.tolist() == [[1, 1, 0, 1, 1, 0, 0]]  # 1 -> 8 crosses; padding scores 0
    assert example.segment_ids_BL.tolist() == [[1, 1, 1, 2, 2, 2, 0]]
    assert example.positions_BL.tolist() == [[0, 1, 2, 0, 1, 2, 0]]


def test_weighted_cross_entropy_ignores_zero_weight_positions():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 10))
    targets = np.array([[1, 2, 3, 4]])
    full, n_full = objectives.weighted_cross_entropy(logits, targets, np.ones((1, 4), np.float32))
    half, n_half = objectives.weighted_cross_entropy(logits, targets, np.array([[1, 1, 0, 0]], np.float32))
    first_two, _ = objectives.weighted_cross_entropy(logits[:, :2], targets[:, :2], np.ones((1, 2), np.float32))
    assert float(n_full) == 4 and float(n_half) == 2
    np.testing.assert_allclose(half, first_two, rtol=1e-6)
    assert float(full) > float(half)


def test_evaluation_is_the_mean_loss_over_every_target_once_on_any_mesh():
    config = tiny_config(eval__batch_size=16, eval__num_batches=0)
    stream = STREAM[:1000]
    model_cfg = ModelConfig.from_config(config.model, 64, config.data.seq_len)
    validation = batches.per_process(rows.validation_rows(stream, 16, 16, pad_id=0), 16)
    losses = []
    for shape, devices in [(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                           (dict(data=2, fsdp=4, tensor=1), jax.devices())]:
        config.mesh.shape.update(shape)
        trainer = make_trainer(config, model_cfg, sharding.make_mesh(config, devices), pad_id=0)
        params = trainer.init().params
        losses.append(evaluate(trainer, params, validation))
    windows = (len(stream) - 1) // 16
    windows_BL = np.stack([stream[i * 16:i * 16 + 17] for i in range(windows)])
    example = objectives.causal_lm({"tokens": windows_BL}, pad_id=0)
    total, count = objectives.weighted_cross_entropy(
        trainer.model.apply({"params": jax.device_get(params)}, example.inputs_BL), example.targets_BL,
        example.weights_BL)
    assert float(count) == windows * 16
    np.testing.assert_allclose(losses, float(total) / float(count), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--config.mesh.shape.data=2"],
                                    ["--config.mesh.shape.stage=2", "--config.mesh.shape.data=1",
                                     "--config.model.scan_layers=True", "--config.train.microbatches=2"]],
                         ids=["data2", "stage2"])
def test_a_whole_validation_split_in_small_batches_on_2_cpu_devices_evaluates_to_the_end(tmp_path, layout):
    """Found by trials: with every evaluation step dispatched at once, the ~110 batches of
    the Shakespeare recipe's validation split on 2 XLA:CPU devices deadlocked in a
    collective's rendezvous and aborted the run (exit 134) after its last training step;
    so did a pipeline's stage-to-stage shift when the partitioner made it all-to-alls."""
    result = run_cli("lm.main", "--config=configs/shakespeare_char.py", f"--workdir={tmp_path}", *layout,
                     "--config.train.steps=2", "--config.optim.warmup_steps=1", "--config.train.eval_every=0",
                     "--config.train.batch_size=16", "--config.eval.batch_size=16", "--config.mesh.cpu_devices=2",
                     "--config.sample.max_new_tokens=0", timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final validation loss" in result.stdout


def test_gradient_accumulation_over_4_microbatches_equals_the_full_batch_step():
    mesh = dict(data=2, fsdp=2, tensor=2)
    full_losses, full = train_three_steps(mesh, jax.devices(), train__batch_size=32)
    micro_losses, micro = train_three_steps(mesh, jax.devices(), train__batch_size=32, train__microbatches=4)
    np.testing.assert_allclose(micro_losses, full_losses, rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(micro.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_microbatch_slices_take_strided_rows_so_each_device_keeps_its_own():
    rows = np.arange(8)[:, None] * np.ones((1, 3), int)
    slices = np.asarray(microbatch_slices(rows, 4))
    assert slices.shape == (4, 2, 3) and slices[1, :, 0].tolist() == [1, 5]


def test_a_run_with_max_new_tokens_0_trains_and_writes_no_sample(tmp_path):
    """sample.max_new_tokens=0 (a sweep point's usual wish) means no sample, not a decode error."""
    from lm.training import loop

    final = loop.train_and_evaluate(tiny_config(train__steps=4, sample__max_new_tokens=0), str(tmp_path))
    assert np.isfinite(final["loss"]) and (tmp_path / "final_metrics.json").exists()
    assert not (tmp_path / "samples.txt").exists()
