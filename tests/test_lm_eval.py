"""An evaluation client no one here wrote: EleutherAI's lm-evaluation-harness scores a
multiple-choice task through `lm.serve` (its `local-completions` model, the server's own
tokenizer endpoints) and agrees with `lm.evaluate --multiple_choice` on the same items
and the same model: the same accuracies, and each choice's log-likelihood to 1e-4."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env, random_export, run_cli, start_server

KEY = "test-key"

TASK_DIR = os.path.join("tests", "data", "lm_eval")
ITEMS = os.path.join(TASK_DIR, "shakespeare_mc.jsonl")


CONTEXT = 128  # every item fits: the harness and lm.evaluate cut long items differently


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_export(str(tmp_path_factory.mktemp("lm_eval") / "export"), seq_len=CONTEXT)


@pytest.fixture(scope="module")
def served(model):
    with start_server(model, "--max_batch=8", api_key=KEY) as base:
        yield base


def harness(base: str, output: str) -> dict:
    """Runs the harness's CLI as the README shows, offline; returns its results and samples."""
    env = dict(cli_env(), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY=KEY,
               HF_HOME=os.path.join(output, "hf_home"))  # the datasets cache, not the user's
    model_args = (f"model=tiny,base_url={base}/v1/completions,tokenizer_backend=remote,auth_token={KEY},"
                  f"max_length={CONTEXT},custom_prefix_token_id=1")
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "local-completions",
         "--model_args", model_args, "--include_path", TASK_DIR, "--tasks", "lm_shakespeare_mc",
         "--batch_size", "4", "--output_path", output, "--log_samples"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (results_file,) = glob.glob(os.path.join(output, "**", "results_*.json"), recursive=True)
    (samples_file,) = glob.glob(os.path.join(output, "**", "samples_lm_shakespeare_mc_*.jsonl"), recursive=True)
    with open(results_file) as f:
        results = json.load(f)["results"]["lm_shakespeare_mc"]
    with open(samples_file) as f:
        samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    return {"results": results, "samples": samples}


def test_the_harness_through_the_server_agrees_with_lm_evaluate(served, model, tmp_path):
    scored = harness(served, str(tmp_path / "harness"))
    run_cli("lm.evaluate", f"--workdir={model}", f"--multiple_choice={ITEMS}",
            f"--output={tmp_path / 'ours.json'}")
    with open(tmp_path / "ours.json") as f:
        ours = json.load(f)["multiple_choice/0_shot"]

    assert ours["questions"] == len(scored["samples"]) == 12
    for sample, row in zip(scored["samples"], ours["details"]):  # every choice of every item, in order
        theirs = [float(response[0][0]) for response in sample["resps"]]
        assert theirs == pytest.approx(row["log_likelihoods"], abs=1e-4)
    assert scored["results"]["acc,none"] == ours["accuracy"]
    assert scored["results"]["acc_bytes,none"] == ours["accuracy_normalized"]
