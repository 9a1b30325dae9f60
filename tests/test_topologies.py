"""Cloud TPU slice names read as chips: the number counts TensorCores on v4 and v5p (two a
chip) and chips on v5e and v6e."""

import importlib.util
import re
import sys

import jax
import pytest
from helpers import tiny_config

from lm.model import ModelConfig
from lm.model.counting import train_flops_per_token
from lm.parallel import sharding, topologies
from lm.parallel.topologies import GiB, TopologyError
from lm.training import aot, memory
from lm.training.trainer import make_trainer

pytestmark = pytest.mark.optimized  # the TPU compiler's view of a step, as a user's compile gives it


@pytest.mark.parametrize("name, chips, hbm_gib", [
    ("v4-8", 4, 32), ("v5p-128", 64, 95), ("v5litepod-256", 256, 16), ("v5e-16", 16, 16), ("v6e-64", 64, 32),
])
def test_a_slice_name_gives_its_chips_and_their_memory(name, chips, hbm_gib):
    slices = topologies.parse(name)
    assert slices.chips == chips and slices.chip.hbm_bytes == hbm_gib * GiB


def test_slices_over_the_data_centre_network_multiply_the_chips():
    slices = topologies.parse("v5p-128", num_slices=2)
    assert slices.chips == 128
    assert slices.describe() == "v5p-128 x 2 slices: 128 TPU v5p chips, 95 GiB of HBM each"


@pytest.mark.parametrize("name, num_slices, message", [
    ("v7-8", 1, r"'v7-8' is not a TPU slice name lm knows\. Fix: .*v4, v5p, v5e, v6e, v5litepod"),
    ("tpu", 1, "is not a TPU slice name"),
    ("v5p-3", 1, r"counts TensorCores, two per chip, so 3 is not a slice\. Fix: use a size such as v5p-16"),
    ("v5e-0", 1, "so 0 is not a slice"),
    ("v5p-128", 0, "--num_slices=0 must be at least 1"),
])
def test_a_name_that_is_not_a_slice_is_one_usage_error_with_the_fix(name, num_slices, message):
    with pytest.raises(TopologyError, match=message):
        topologies.parse(name, num_slices)


@pytest.mark.parametrize("name, grid", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-128", "v5p:4x4x4"), ("v5p-256", "v5p:4x4x8"),
    ("v4-32", "v4:2x2x4"), ("v5e-1", "v5e:1x1"), ("v5e-8", "v5e:2x4"), ("v5e-16", "v5e:4x4"),
    ("v5litepod-256", "v5e:16x16"), ("v6e-64", "v6e:8x8"),
])
def test_a_slice_is_laid_out_as_cloud_tpu_lays_out_its_chips(name, grid):
    assert topologies.parse(name).topology_name == grid


def test_the_tpu_compiler_gives_one_compile_only_device_per_chip_and_slice():
    devices = topologies.compile_devices(topologies.parse("v5e-4", num_slices=2))
    assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}
    assert sorted({d.slice_index for d in devices}) == [0, 1]


@pytest.mark.parametrize("name", ["v4-8", "v5p-8", "v5e-1", "v6e-1", "v5e-8"])
def test_every_generation_compiles_for_one_device_a_chip(name):
    slices = topologies.parse(name)
    assert len(topologies.compile_devices(slices)) == slices.chips


def test_a_slice_the_tpu_compiler_rejects_is_one_usage_error_listing_the_sizes_cloud_tpu_offers():
    with pytest.raises(TopologyError, match=r"v5e-12: 12 v5e chips do not make a slice .*Fix: use a slice size Cloud "
                                            r"TPU offers: v5e-1, v5e-4, v5e-8, v5e-16"):
        topologies.compile_devices(topologies.parse("v5e-12"))


def test_a_slice_name_is_read_trimmed_and_in_its_canonical_spelling():
    assert topologies.parse(" v5e-016 ").name == "v5e-16"
    with pytest.raises(TopologyError, match=r"slice names are lower case\. Fix: --topology=v5p-128"):
        aot.target("V5P-128", compile_only=True)


def test_without_libtpu_the_check_says_which_extra_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # what an uninstalled package looks like to import
    with pytest.raises(TopologyError, match=r"not installed\. Fix: pip install -e '\.\[tpu\]'.*--topology=cpu:64"):
        topologies.compile_devices(topologies.parse("v5p-128"))


@pytest.mark.parametrize("topology, compile_only, num_slices, message", [
    ("v5p-128", False, 1, "only applies to an ahead-of-time check. Fix: add --compile_only"),
    ("gpu:8", True, 1, r"'gpu:8' is not a topology this check can compile for\. Fix: give a Cloud TPU slice"),
    ("v9-8", True, 1, "is not a TPU slice name lm knows"),
    ("cpu:8", True, 2, "--num_slices=2 multiplies TPU slices, not cpu:8"),
    (None, True, 2, "--num_slices=2 needs a TPU slice"),
])
def test_a_topology_the_check_cannot_compile_for_is_one_error_with_the_fix(topology, compile_only, num_slices,
                                                                          message):
    with pytest.raises(ValueError, match=message):
        aot.target(topology, compile_only, num_slices)


def test_a_tpu_target_compiles_from_one_cpu_device_and_cpu_n_fakes_n():
    assert aot.target("v5p-128", True).host_cpu_devices == 1
    assert aot.target("cpu:64", True).host_cpu_devices == 64 and aot.target(None, False).host_cpu_devices == 0


def _tpu_config(**overrides):
    return tiny_config(**{"model__scan_layers": False, "model__remat": "none", "model__vocab_size": 1024,
                          "mesh__shape": {"data": 1, "fsdp": -1, "tensor": 1}, **overrides})


def test_with_remat_off_and_attention_counted_in_full_the_compiled_flops_match_lms_count():
    """The TPU compiler's FLOPs per step (per chip x chips) and lm.model.counting's, both
    counting causal attention's scores in full, agree within 5% (seen: 2.0% over, XLA's
    element-wise work)."""
    config = _tpu_config(model__d_model=256, model__num_heads=4, model__num_layers=2, data__seq_len=128,
                         model__positions="rope", train__batch_size=4)
    mesh = sharding.make_mesh(config, topologies.compile_devices(topologies.parse("v5e-4")))
    model_cfg = ModelConfig.for_run(config, 1024)
    trainer = make_trainer(config, model_cfg, mesh, pad_id=0, tokenizer_vocab_size=1024, teacher=None)
    flops = aot.flop_counts(trainer.compile_step(4, 128), model_cfg, config, mesh.size)
    in_full = train_flops_per_token(model_cfg, 256, causal_in_full=True) * 4 * 128
    assert flops["flops_per_step_compiled"] == pytest.approx(in_full, rel=0.05)
    assert flops["flops_per_step_lm"] < in_full  # lm's own count takes causal attention at half


def test_the_report_names_the_chip_and_what_the_step_needs_of_its_hbm(capsys):
    figures = aot.compile_and_report(_tpu_config(), topologies.parse("v5e-4"))
    out = capsys.readouterr().out
    assert "for v5e-4: 4 TPU v5e chips, 16 GiB of HBM each, mesh data=1 x fsdp=4 x tensor=1" in out
    assert "per device, compiled (TPU compiler): arguments" in out
    assert "memory: the step fits in a TPU v5e chip's 16.00 GiB of HBM" in out
    assert "FLOPs per step: compiled program" in out and "XLA counts causal attention's score matmuls in full" in out
    assert "step time at least" in out and "MFU" in out
    assert 0 < figures["total"] < 16 * GiB and figures["flops_per_step_compiled"] > 0


def test_a_step_that_does_not_fit_the_chip_names_the_bytes_the_hbm_and_the_settings_that_lower_them(capsys):
    config = _tpu_config(train__batch_size=512, data__seq_len=2048, model__vocab_size=32768,
                         mesh__shape={"data": 4, "fsdp": 1, "tensor": 1})
    with pytest.raises(memory.DoesNotFitError) as error:
        aot.compile_and_report(config, topologies.parse("v5e-4"))
    message = str(error.value)
    assert "a device has 16.00 GiB" in message and "GiB a device (the compiler: Ran out of memory on HBM" in message
    assert "config.model.remat='full'" in message
    microbatches = int(re.search(r"config\.train\.microbatches=(\d+): (\d+) of the 128 rows", message).group(1))
    assert microbatches >= 2 and 128 % microbatches == 0  # enough for the excess, and dividing the rows
    assert "fsdp" not in message  # 1 MiB of parameters: sharding them is no fix
    assert "does NOT fit" in capsys.readouterr().out  # the report comes first


def test_the_fixes_offered_follow_what_takes_the_memory():
    config = _tpu_config(train__batch_size=64, mesh__shape={"data": 8, "fsdp": 1, "tensor": 1})
    cfg = ModelConfig.for_run(config, 1024)
    big_state = memory.does_not_fit(40 * GiB, 16 * GiB, "...", config, {"data": 8, "fsdp": 1, "tensor": 1}, cfg,
                                    state_bytes=20 * GiB)
    assert "config.mesh.shape.fsdp=-1" in big_state and "20.00 GiB of train state a device" in big_state
    one_row_config = _tpu_config(train__batch_size=8, mesh__shape={"data": 8, "fsdp": 1, "tensor": 1})
    one_row = memory.does_not_fit(40 * GiB, 16 * GiB, "...", one_row_config, {"data": 8, "fsdp": 1, "tensor": 1}, cfg,
                                  state_bytes=GiB)
    assert "even one of the 1 rows a device at once is too many: a smaller data.seq_len" in one_row


def test_a_mesh_that_does_not_divide_the_slices_chips_is_one_error():
    with pytest.raises(sharding.MeshError, match=r"needs 3 devices, but 4 are available"):
        aot.compile_and_report(_tpu_config(mesh__shape={"data": 3, "fsdp": 1, "tensor": 1}), topologies.parse("v5e-4"))


def test_a_dcn_shape_over_more_slices_than_the_devices_form_is_one_error():
    config = _tpu_config(mesh__dcn_shape={"data": 2, "fsdp": 1, "tensor": 1})
    with pytest.raises(sharding.MeshError, match=r"spreads the mesh over 2 slices or nodes, but these 8 devices form "
                                                 r"1 slice\(s\) in 1 process\(es\)\. Fix: .*--num_slices=2"):
        sharding.make_mesh(config)


def test_a_stage_axis_across_slices_on_one_host_is_refused_for_its_dcn_shape_not_its_shape():
    config = _tpu_config(mesh__shape={"stage": 2, "data": -1, "fsdp": 1, "tensor": 1},
                         mesh__dcn_shape={"stage": 2, "data": 1, "fsdp": 1, "tensor": 1})
    with pytest.raises(sharding.MeshError, match=r"config.mesh.dcn_shape \(stage=2 x data=1 x fsdp=1 x tensor=1\) "
                                                 r"spreads the mesh over 2 slices or nodes, but these 2 devices form"):
        sharding.make_mesh(config, jax.devices()[:2])


def test_a_dcn_shape_for_other_slices_than_num_slices_names_the_product_it_must_have():
    config = _tpu_config(mesh__dcn_shape={"stage": 2, "data": 1, "fsdp": 1, "tensor": 1})
    with pytest.raises(TopologyError, match=r"--num_slices=4 but .* over 2 slice\(s\)\. Fix: make "
                                            r"config.mesh.dcn_shape's sizes multiply to 4: "):
        aot.compile_and_report(config, topologies.parse("v5e-4", num_slices=4))


def test_when_the_kernel_falls_back_the_report_names_the_one_that_serves(capsys):
    aot.compile_and_report(_tpu_config(), topologies.parse("v5e-4"))  # rows of 64 tokens: splash needs 128s
    assert "xla attention (splash falls back to it here)" in capsys.readouterr().out


def test_slices_over_dcn_need_a_dcn_shape_that_spans_them():
    with pytest.raises(TopologyError, match=r"--num_slices=2 but config.mesh.dcn_shape .* over 1 slice\(s\)\. "
                                            r"Fix: .*--config.mesh.dcn_shape.data=2"):
        aot.compile_and_report(_tpu_config(), topologies.parse("v5e-4", num_slices=2))


def test_with_the_tpu_compiler_installed_a_cpu_process_starts_jax_without_a_word():
    import subprocess

    from helpers import REPO, cli_env

    assert importlib.util.find_spec("libtpu"), "the test extra installs libtpu"
    env = {k: v for k, v in cli_env().items() if not k.startswith("TPU_")}
    result = subprocess.run([sys.executable, "-c", "import lm, jax; print(jax.devices()[0].platform)"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "cpu" and result.stderr == "", result.stderr
