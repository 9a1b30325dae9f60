"""bench/accelerator.py on the CPU, run the way a GPU machine without the data libraries runs it."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

# What a GPU machine with only JAX, Flax, Optax, Orbax and ml-collections lacks: importing
# any of these in the bench's process fails, as it would there.
ABSENT = ("grain", "tensorflow_datasets", "tensorflow", "array_record", "datasketch", "sacrebleu", "rouge_score",
          "sklearn", "matplotlib", "tensorboardX", "fastapi", "uvicorn", "torch", "transformers")
WITHOUT_DATA_LIBRARIES = f"""
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError(name + " is not installed on the accelerator machine")
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TINY = ["--config=configs/shakespeare_char.py", "--preset=tiny", "--seq_len=128", "--batch_size=4", "--steps=2",
        "--warmup=1"]


def run_accelerator(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_DATA_LIBRARIES, os.path.join(REPO, "bench", "accelerator.py"),
                           *flags], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.bench
def test_accelerator_bench_prints_its_row_without_grain_or_tfds():
    result = run_accelerator(*TINY, "--attention=xla")
    assert result.returncode == 0, result.stderr
    header, rule, row = result.stdout.splitlines()[-3:]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert rule.startswith("|---|")
    fields = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
    assert fields["device"].startswith("cpu x ") and fields["jax"] and fields["attention"] == "xla", row
    assert fields["context"] == "128" and fields["batch"] == "4" and fields["model"].startswith("tiny: 2 layers")
    assert float(fields["tokens/s"].replace(",", "")) > 0 and float(fields["ms/step"]) > 0
    assert float(fields["MFU"].rstrip("%")) > 0 and "measured float32 matmul" in fields["MFU against"]
    assert fields["peak memory"].endswith("(XLA's step total)"), row


@pytest.mark.bench
def test_accelerator_bench_rejects_an_unknown_preset_in_one_line():
    result = run_accelerator(*TINY, "--preset=gpt5")
    assert result.returncode != 0
    assert "--preset=gpt5 is not a preset. Fix: use one of tiny, gpt2-small" in result.stderr
    assert "Traceback" not in result.stderr


def test_device_check_rejects_an_unknown_argument_and_a_missing_wheels_folder(tmp_path):
    script = os.path.join(REPO, "bench", "device_check.sh")
    run = lambda *args: subprocess.run(["bash", script, *args, f"--out={tmp_path}"], cwd=REPO, capture_output=True,
                                       text=True, timeout=60)
    unknown = run("--gpu")
    assert unknown.returncode == 2 and "unknown argument --gpu. Fix: use --wheels=DIR" in unknown.stderr
    missing = run(f"--wheels={tmp_path}/nowhere")
    assert missing.returncode == 2 and "is not a folder. Fix: pass the folder pip download wrote" in missing.stderr
