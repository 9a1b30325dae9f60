"""The CLI end to end, as the README runs it: outputs, exact resume after kill -9, sampling."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import REPO, cli_env, cli_flags, run_cli

import lm
from lm.runs import artifacts, checkpoint

CONFIG = f"--config={os.path.join(REPO, 'configs', 'shakespeare_char.py')}"
BPE_CONFIG = f"--config={os.path.join(REPO, 'configs', 'shakespeare_bpe.py')}"

pytestmark = pytest.mark.slow


def read_metrics(workdir) -> list[dict]:
    """metrics.jsonl's records ([] before it exists). Safe while a run writes: a line still
    being written has no newline yet and is left out (a kill -9's torn line is cut by the
    rerun's lm.training.logs.cut_torn_line)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An 8-step run with checkpoints at 4 and 8, and its CLI output."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    relative = os.path.relpath(workdir, REPO)  # a relative workdir, as in the README's command
    result = run_cli("lm.main", CONFIG, f"--workdir={relative}",
                     *cli_flags(train__steps=8, train__eval_every=4, train__checkpoint_every=4))
    return workdir, result


def test_a_run_writes_checkpoints_metrics_events_config_and_a_sample(finished_run):
    workdir, result = finished_run
    assert "final validation loss" in result.stdout and "--- sample (step 8) ---" in result.stdout
    assert "non-embedding), optimizer adamw (cosine, lr 0.001); " in result.stdout  # the start-up line
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in records if "validation/loss" in r] == [4, 8]
    assert {"validation/perplexity", "validation/bits_per_byte"} <= set(records[-1])
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 8
    assert (workdir / "samples.txt").read_text().startswith("--- step 8")
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert f"{final['validation/loss']:.4f}" in result.stdout

    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("validation/loss")] == [4, 8]


def sample(workdir, *flags) -> list[str]:
    result = run_cli("lm.sample", f"--workdir={os.path.relpath(workdir, REPO)}", "--prompt=ROMEO:",
                     "--max_new_tokens=30", "--temperature=0.8", "--top_k=5", *flags)
    return result.stdout.split("--- sample ")[1:]


def test_sample_cli_continues_a_prompt_from_the_latest_or_a_chosen_checkpoint(finished_run, tmp_path):
    workdir, _ = finished_run
    samples = sample(workdir, "--num_samples=2")
    assert len(samples) == 2 and all("(checkpoint step 8)" in text for text in samples)
    at_step_4 = sample(workdir, "--step=4")
    assert "(checkpoint step 4)" in at_step_4[0]
    for text in samples + at_step_4:
        body = text.split("---\n", 1)[1].rstrip("\n")
        assert body.startswith("ROMEO:") and len(body) == len("ROMEO:") + 30
    missing = run_cli("lm.sample", f"--workdir={tmp_path / 'nothing'}", check=False)
    assert missing.returncode == 2 and "config.json does not exist" in missing.stderr
    no_step = run_cli("lm.sample", f"--workdir={workdir}", "--step=5", check=False)
    assert no_step.returncode == 2 and "no checkpoint of step 5" in no_step.stderr and "[4, 8]" in no_step.stderr


def test_checkpoints_record_the_config_and_code_and_an_export_keeps_only_the_params(finished_run, tmp_path):
    trained_run, _ = finished_run
    meta = checkpoint.Checkpointer(str(trained_run / "checkpoints"), read_only=True).metadata(8)
    assert meta["config"]["train"]["steps"] == 8 and meta["version"]["lm"] == lm.__version__
    assert meta["version"]["git_commit"] is None or len(meta["version"]["git_commit"]) == 40

    trained = artifacts.load(str(trained_run))
    for dtype in ("float32", "bfloat16"):
        out = run_cli("lm.export", f"--workdir={trained_run}", f"--output={tmp_path / dtype}", f"--dtype={dtype}")
        assert "exported step 8: " in out.stdout and f"in {dtype} to" in out.stdout
        exported = artifacts.load(str(tmp_path / dtype))
        assert sorted(os.listdir(tmp_path / dtype)) == ["config.json", "export.json", "params", "tokenizer.json"]
        for got, want in zip(jax.tree.leaves(exported.params), jax.tree.leaves(trained.params), strict=True):
            assert got.dtype == dtype and np.array_equal(np.asarray(got), np.asarray(want.astype(dtype)))
    assert sample(tmp_path / "float32") == sample(trained_run)  # same text, token for token

    again = run_cli("lm.export", f"--workdir={trained_run}", f"--output={tmp_path / 'float32'}", check=False)
    assert again.returncode == 2 and "exists and is not empty; exporting never overwrites" in again.stderr


def wait_for_checkpoint(process: subprocess.Popen, directory, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (directory / str(step)).exists():  # orbax renames a finished save into place
        assert process.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.resume
@pytest.mark.parametrize("build", ["memory", "datatrove"])
def test_a_packed_sentencepiece_run_killed_and_restarted_ends_exactly_like_an_uninterrupted_one(tmp_path, build):
    """The packed pipeline's position survives kill -9 (test_reliability kills the
    character recipe several times, mid-save too); on a datatrove build, `lm.prepare`
    tokenizes first and the runs read its tokens without rewriting them."""
    config = BPE_CONFIG
    flags = cli_flags(train__steps=40, train__log_every=1, train__eval_every=20, train__checkpoint_every=10)
    if build == "datatrove":  # a corpus built and tokenized anew
        flags += [f"--config.data.build={build}", f"--config.data.data_dir={tmp_path / 'data'}"]
        tokens = run_cli("lm.prepare", config, *flags).stdout.split("tokens: ")[-1].strip()
        stored = os.stat(os.path.join(tokens, "train.tokens.npy")).st_mtime_ns
    whole = tmp_path / "uninterrupted"
    expected = run_cli("lm.main", config, f"--workdir={whole}", *flags)

    resumed = tmp_path / "killed"
    command = [sys.executable, "-m", "lm.main", config, f"--workdir={resumed}", *flags]
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_checkpoint(process, resumed / "checkpoints", 20)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = run_cli("lm.main", config, f"--workdir={resumed}", *flags)

    assert "resuming from the checkpoint at step" in finished.stdout
    final_line = lambda out: [line for line in out.splitlines() if line.startswith("final validation loss")][0]
    assert final_line(finished.stdout) == final_line(expected.stdout)
    by_step = lambda records: {r["step"]: r for r in records if "train/loss" in r}
    want, got = by_step(read_metrics(whole)), by_step(read_metrics(resumed))
    for step in range(21, 41):  # every step after the restart repeats the same loss, bit for bit
        assert got[step]["train/loss"] == want[step]["train/loss"], step
    if build == "datatrove":
        assert os.stat(os.path.join(tokens, "train.tokens.npy")).st_mtime_ns == stored


def run_bench(script: str, *flags: str) -> tuple[str, dict[str, str]]:
    """A benchmark's output on the tiny config, and its "name: value" figures."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), CONFIG, *flags, *cli_flags()],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout, dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


@pytest.mark.bench
def test_throughput_benchmark_prints_its_figures():
    out, figures = run_bench("train_throughput.py", "--steps=3", "--warmup=2")
    for name in ("ms_per_step", "tokens_per_second", "compile_seconds", "peak_rss_mib", "mfu"):
        assert name in figures, out
    assert float(figures["tokens_per_second"].replace(",", "")) > 0
    assert 0 < float(figures["mfu"]) < 1
    roofline = float(figures["roofline_tokens_per_second"].split()[0].replace(",", ""))
    assert roofline > float(figures["tokens_per_second"].replace(",", ""))


@pytest.mark.bench
def test_pytorch_reference_times_the_same_step_or_says_how_to_install_pytorch():
    command = [sys.executable, os.path.join(REPO, "bench", "torch_reference.py"), CONFIG, *cli_flags()]
    unsupported = subprocess.run([*command, "--config.model.activation=swiglu"], cwd=REPO, env=cli_env(),
                                 capture_output=True, text=True, timeout=120)
    assert unsupported.returncode != 0 and "config.model.activation='swiglu'" in unsupported.stderr
    if importlib.util.find_spec("torch") is None:  # PyTorch is not a dependency of lm
        missing = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert missing.returncode != 0 and "pip install torch==2.13.0" in missing.stderr
        return
    out, figures = run_bench("torch_reference.py", "--steps=3", "--warmup=1")
    assert float(figures["tokens_per_second"].replace(",", "")) > 0, out
    assert float(figures["ms_per_step"].split()[0]) > 0, out


@pytest.mark.bench
def test_compile_time_benchmark_prints_both_depths_with_and_without_scan():
    out, _ = run_bench("compile_time.py", "--depths=1,3")
    lines = [line for line in out.splitlines() if line.startswith("compile_seconds")]
    assert len(lines) == 4 and all(float(line.rsplit(": ", 1)[1]) > 0 for line in lines)
    assert "ratio_3_over_1 scan_layers=True" in out


@pytest.mark.bench
def test_checkpoint_benchmark_prints_blocked_time_of_async_and_sync_saves():
    out, figures = run_bench("checkpoint.py", "--repeats=1")
    assert {"sync_blocked_seconds", "async_blocked_seconds", "async_over_sync"} <= set(figures), out
    assert float(figures["async_over_sync"].split()[0]) > 0
