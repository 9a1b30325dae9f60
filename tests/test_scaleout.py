"""Scale-out: every sharding strategy is a mesh shape under one rule table and trains like
one device; multi-process runs, the ahead-of-time check, launch scripts' dry runs."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, cli_env, cli_flags, run_cli, tiny_config
from test_multihost import free_port
from test_train import train_three_steps

from lm.errors import UsageError
from lm.model import ModelConfig
from lm.parallel import distributed, sharding
from lm.parallel.sharding import MeshError
from lm.training.trainer import make_trainer

# name -> (mesh shape on 8 devices, the shard shape of one [embed=32, mlp=128] MLP kernel)
STRATEGIES = {
    "dp8": (dict(data=8, fsdp=1, tensor=1), (32, 128)),  # replicated
    "fsdp8": (dict(data=1, fsdp=8, tensor=1), (4, 128)),  # embed split 8 ways
    "dp2_tp4": (dict(data=2, fsdp=1, tensor=4), (32, 32)),  # mlp split 4 ways
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), (16, 64)),
}
FOUR_HEADS = dict(model__num_heads=4)  # divisible by every tensor size here


@pytest.fixture(scope="module")
def single_device_losses():
    return train_three_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], **FOUR_HEADS)[0]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGIES.keys())
def test_each_strategy_trains_like_one_device_with_the_shardings_its_rules_give(single_device_losses, strategy):
    mesh_shape, kernel_shard = STRATEGIES[strategy]
    losses, state = train_three_steps(mesh_shape, jax.devices(), **FOUR_HEADS)
    np.testing.assert_allclose(losses, single_device_losses, rtol=0, atol=1e-5)
    kernel = state.params["layer_0"]["mlp"]["wi"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == kernel_shard
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # rules: embed->fsdp, mlp->tensor
    qkv = state.params["layer_0"]["attn"]["qkv"]["kernel"]  # [embed, 3, heads, head_dim]
    assert qkv.addressable_shards[0].data.shape[2] == 4 // mesh_shape["tensor"]
    adam = state.opt_state[1][0]
    for moment in (adam.mu, adam.nu):  # optimizer state lives where its parameter does
        assert moment["layer_0"]["mlp"]["wi"]["kernel"].sharding == kernel.sharding
        assert moment["layer_0"]["attn"]["qkv"]["kernel"].sharding == qkv.sharding


def test_a_mesh_axis_that_does_not_divide_the_dimension_it_shards_fails_before_compiling():
    config = tiny_config()  # 2 heads
    config.mesh.shape.update(dict(data=2, fsdp=1, tensor=4))
    mesh = sharding.make_mesh(config, jax.devices())
    with pytest.raises(MeshError, match=r"parameter \['layer_0'\]\['attn'\]\['\w+'\]\['kernel'\] has 2 along "
                                          r"'heads'.*tensor=4 \(4 devices\); 4 does not divide 2\. Fix: make "
                                          r"config\.model\.num_heads a multiple of 4"):
        make_trainer(config, ModelConfig.from_config(config.model, 64, 16), mesh, pad_id=0)


@pytest.mark.multihost
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one_process(tmp_path):
    flags = cli_flags(train__log_every=1, train__batch_size=8, train__checkpoint_every=0, optim__decay_steps=5)
    one_process = ["--config=configs/shakespeare_char.py", "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=4"]
    single = run_cli("lm.main", *one_process, f"--workdir={tmp_path / 'one'}", *flags, "--config.train.steps=5",
                     timeout=240)
    coordinator = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "two"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "lm.main", "--config=configs/shakespeare_char.py", f"--workdir={workdir}", *flags,
         "--config.train.steps=3", "--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=2",
         "--config.mesh.dcn_shape.data=2", f"--coordinator_address={coordinator}", "--num_processes=2",
         f"--process_id={i}"],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert "4 cpu devices, mesh data=2 x fsdp=2 x tensor=1" in outputs[0]
    assert "final validation loss" in outputs[0] and "final validation loss" not in outputs[1]  # process 0 reports
    one, two = train_metrics(tmp_path / "one"), train_metrics(workdir)
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one[:3]], rtol=0, atol=1e-5)
    assert "final validation loss" in single.stdout

    # The two processes' checkpoint of step 3 resumes in one process, data position included.
    resumed = run_cli("lm.main", *one_process, f"--workdir={workdir}", *flags, "--config.train.steps=5",
                      timeout=240)
    assert "resuming from the checkpoint at step 3" in resumed.stdout
    assert "written by 2 processes; this run has 1" in resumed.stderr
    np.testing.assert_allclose([r["loss"] for r in train_metrics(workdir)[3:]], [r["loss"] for r in one[3:]],
                               rtol=0, atol=1e-5)


def train_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "grad_norm" in r]


def test_explicit_cluster_flags_must_come_together_and_slurm_variables_name_the_cluster():
    with pytest.raises(ValueError, match=r"--num_processes --process_id missing"):
        distributed.resolve(coordinator_address="10.0.0.1:1234")
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    cluster = distributed.resolve(distributed=True, env=env)
    assert (cluster.coordinator_address, cluster.num_processes, cluster.process_id, cluster.local_device_ids) == \
        ("gpu07:" + str(61000 + 4242 % 4096), 16, 9, (1,))
    assert distributed.resolve(env=env) is None  # without --distributed a SLURM job step may be one process
    assert distributed.expand_hostlist("a[1-3,10],b7,c[08-09]") == ["a1", "a2", "a3", "a10", "b7", "c08", "c09"]


@pytest.mark.parametrize("env, message", [
    ({"LM_COORDINATOR_ADDRESS": "h:1"}, "LM_NUM_PROCESSES is not set"),
    ({"LM_COORDINATOR_ADDRESS": "h:1", "LM_NUM_PROCESSES": "x", "LM_PROCESS_ID": "0"}, "LM_NUM_PROCESSES='x' is not"),
    ({"LM_COORDINATOR_ADDRESS": "h:1", "LM_NUM_PROCESSES": "2", "LM_PROCESS_ID": "7"},
     r"LM_PROCESS_ID=7 is not in \[0, LM_NUM_PROCESSES=2\)"),
    ({"LM_COORDINATOR_ADDRESS": "h", "LM_NUM_PROCESSES": "2", "LM_PROCESS_ID": "1"}, "'h' is not host:port"),
    ({"SLURM_JOB_ID": "abc", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1"}, "SLURM_JOB_ID='abc' is not"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, "no node list names a node"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-2]", "SLURM_PROCID": "2"},
     r"SLURM_PROCID=2 is not in \[0, SLURM_NTASKS=2\)"),
])
def test_a_cluster_environment_that_cannot_work_is_a_usage_error_naming_the_variable(env, message):
    with pytest.raises(UsageError, match=message + ".*Fix"):
        distributed.resolve(distributed=True, env=env)


def test_lm_distributed_reports_a_bad_cluster_environment_in_one_line():
    result = subprocess.run([sys.executable, "-m", "lm.distributed"], cwd=REPO, capture_output=True, text=True,
                            env=dict(cli_env(), LM_COORDINATOR_ADDRESS="h:1"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lm: error: LM_NUM_PROCESSES is not set. Fix: set it with the other variables of the cluster, or unset them."]


@pytest.mark.slow
@pytest.mark.optimized  # the memory a user's TPU compile needs, as the next two
def test_gpt2_small_compiles_with_the_tpu_compiler_for_a_v5e_16_and_fits_its_16_gib_chips():
    result = run_cli("lm.main", "--config=configs/gpt2_small.py", "--compile_only", "--topology=v5e-16",
                     timeout=600)
    out = result.stdout
    assert "for v5e-16: 16 TPU v5e chips, 16 GiB of HBM each, mesh data=1 x fsdp=16 x tensor=1" in out
    assert "per device, compiled (TPU compiler): arguments" in out
    assert "memory: the step fits in a TPU v5e chip's 16.00 GiB of HBM" in out, out


@pytest.mark.optimized
def test_llama3_8b_compiles_with_the_tpu_compiler_for_a_v5p_128_and_fits_its_95_gib_chips():
    result = run_cli("lm.main", "--config=configs/llama3_8b.py", "--compile_only", "--topology=v5p-128", timeout=900)
    assert "8,030,261,248 parameters for v5p-128: 64 TPU v5p chips, 95 GiB of HBM each, mesh data=1 x fsdp=64" \
        in result.stdout
    estimate = re.search(r"optimizer state ([\d.]+) MiB", result.stdout)
    sharded_adam = 8_030_261_248 * 8 / 64 / 2**20  # two float32 moments, 1/64 each (norms are replicated)
    assert estimate and abs(float(estimate.group(1)) / sharded_adam - 1) < 0.005, result.stdout
    assert "memory: the step fits in a TPU v5p chip's 95.00 GiB of HBM" in result.stdout
    assert re.search(r"FLOPs per step: compiled program [\d.e+]+ \(per device x 64\), lm's count", result.stdout)


@pytest.mark.optimized
def test_llama3_8b_compiles_with_pipeline_stages_across_two_v5p_128_slices_and_each_stage_holds_half_the_layers():
    result = run_cli("lm.main", "--config=configs/llama3_8b.py", "--compile_only", "--topology=v5p-128",
                     "--num_slices=2", "--config.mesh.dcn_shape.stage=2", "--config.train.batch_size=128",
                     "--config.eval.batch_size=128", "--config.train.microbatches=2", timeout=900)
    out = result.stdout
    assert "for v5p-128 x 2 slices: 128 TPU v5p chips, 95 GiB of HBM each, mesh stage=2 x data=1 x fsdp=64" in out
    assert "pipeline: 2 stages (GPipe), 2 microbatches: 3 iterations a step, bubble fraction 0.3333" in out
    embedding_and_head = 2 * 128_256 * 4_096  # replicated over the stages, split over fsdp's 64 chips
    layers = 8_030_261_248 - embedding_and_head - 4_096  # split over the 2 stages and fsdp: 1/128 each
    per_chip = (embedding_and_head / 64 + layers / 128) * 4 / 2**20  # float32 parameters, MiB
    estimate = re.search(r"per device, estimated: parameters ([\d.]+) MiB", out)
    assert estimate and abs(float(estimate.group(1)) / per_chip - 1) < 0.005, out
    assert re.search(r"per device, compiled \(TPU compiler\): arguments .* total [\d.]+ GiB", out)
    assert "memory: the step fits in a TPU v5p chip's 95.00 GiB of HBM" in out


def run_launcher(*args: str, cwd: str = REPO, check: bool = True) -> str:
    result = subprocess.run(["bash", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
        return result.stdout
    assert result.returncode == 2, result.stdout
    return result.stdout + result.stderr


def test_tpu_pod_dry_run_prints_every_command_of_a_4_host_job():
    out = run_launcher("launch/tpu_pod.sh", "--dry_run", "--name=lm-pod", "--zone=us-central2-b",
                       "--accelerator_type=v4-32", "--queued", "--", "--config=configs/gpt2_small.py",
                       "--workdir=/mnt/bucket/gpt2")
    lines = out.splitlines()
    assert lines[0] == "# v4-32: 4 hosts, each running the same command"
    assert ("+ gcloud compute tpus queued-resources create lm-pod-request --zone=us-central2-b --node-id=lm-pod "
            "--accelerator-type=v4-32 --runtime-version=v2-alpha-tpuv5-lite") in lines
    ssh = [line for line in lines if "tpu-vm ssh lm-pod --zone=us-central2-b --worker=all" in line]
    assert len(ssh) == 3  # unpack the code, install, run
    assert ssh[-1].endswith("'--command=cd lm && .venv/bin/python -m lm.main --distributed "
                            "--config=configs/gpt2_small.py --workdir=/mnt/bucket/gpt2'")


def test_slurm_dry_run_prints_the_submission_and_what_each_process_will_use():
    out = run_launcher("launch/slurm.sh", "--dry_run", "--nodes=4", "--gpus_per_node=8", "--",
                       "--config=configs/gpt2_small.py", "--workdir=/shared/gpt2")
    lines = out.splitlines()
    assert lines[0] == (f"+ sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --export=ALL,LM_REPO={REPO} "
                        f"{REPO}/launch/slurm.sbatch --config=configs/gpt2_small.py --workdir=/shared/gpt2")
    assert lines[1] == (f"+ srun --kill-on-bad-exit=1 --cpu-bind=none {REPO}/.venv/bin/python -m lm.main --distributed "
                        "--config=configs/gpt2_small.py --workdir=/shared/gpt2")
    assert "4 nodes (node[001-004]), 32 processes" in lines[2]
    assert lines[3] == f"slurm: process 0 of 32, coordinator node001:{61000 + 12345 % 4096}, local devices [0]"
    per_node = run_launcher("launch/slurm.sh", "--dry_run", "--nodes=4", "--per_node", "--", "--workdir=/x")
    assert "--ntasks-per-node=1" in per_node and "process 0 of 4" in per_node and "all local devices" in per_node


def test_local_dry_run_prints_setup_and_the_training_command():
    out = run_launcher("launch/local.sh", "--dry_run", "--config.train.steps=5")
    assert out.splitlines()[-1] == (f"+ {REPO}/.venv/bin/python -m lm.main --config={REPO}/configs/shakespeare_char.py "
                                    "--workdir=/tmp/lm/shakespeare_char --config.train.steps=5")


def test_tpu_pod_passes_a_config_given_from_another_directory_as_its_path_in_the_repository(tmp_path):
    """The hosts run lm.main in their copy of the repository: a relative --config from the caller's directory
    becomes its path there; one outside the repository, which the hosts cannot read, is refused."""
    pod = [os.path.join(REPO, "launch", "tpu_pod.sh"), "--dry_run", "--name=lm-pod", "--zone=us-central2-b", "--"]
    config = os.path.relpath(os.path.join(REPO, "configs", "gpt2_small.py"), tmp_path)
    out = run_launcher(*pod, f"--config={config}:gpu", "--workdir=/mnt/run", cwd=str(tmp_path))
    assert out.splitlines()[-1].endswith("--distributed --config=configs/gpt2_small.py:gpu --workdir=/mnt/run'")
    (tmp_path / "my_model.py").write_text("")
    refused = run_launcher(*pod, "--config=my_model.py", cwd=str(tmp_path), check=False)
    assert "--config=my_model.py is outside the repository" in refused and "gcloud" not in refused
