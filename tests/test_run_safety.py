"""Bad input to what reads and writes runs: each is one `lm: error:` line with the fix and
status 2, found before expensive work, and nothing on disk is lost or half-written.

Training refuses a --workdir that is not a run (an export, a fine-tuning workdir, other
files); a new workdir that fails a later check is removed again; loading names the damaged
file or checkpoint; exports never replace a directory; a Hugging Face checkpoint's damaged
files are named; stale temporaries of killed writers are cleaned up."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import cli_flags, run_cli, tiny_config
from test_end_to_end import CONFIG as CONFIG_FLAG
from test_runs import write_run

from lm import convert
from lm.errors import UsageError
from lm.files import atomic
from lm.runs import artifacts, workdir
from lm.runs.artifacts import RunError
from lm.runs.workdir import WorkdirError


def snapshot(path) -> dict[str, bytes]:
    """Every file under `path` with its content, to show that nothing changed."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return out


def make(path, files: dict[str, str]) -> str:
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(text)
    return str(path)


RUN_CONFIG = tiny_config().to_json_best_effort()


@pytest.mark.parametrize("files, message", [
    ({"export.json": "{}", "config.json": RUN_CONFIG}, "is an lm export"),
    ({"finetune_results.json": "{}", "config.json": RUN_CONFIG}, "is a fine-tuning workdir"),
    ({"best/best.json": "{}"}, "is a fine-tuning workdir"),
    ({"config.json": json.dumps({"finetune": {}, "task": {}})}, "its config.json is a fine-tuning config"),
    ({"config.json": json.dumps({"model_type": "gpt2"})}, "Hugging Face model's config"),
    ({"config.json": "{oops"}, r"config.json is not JSON \(Expecting property name"),
    ({"config.json": RUN_CONFIG, "tokenizer.json": "{"}, "tokenizer.json is not JSON"),
])
def test_training_refuses_a_directory_that_is_not_a_run_and_changes_nothing(tmp_path, files, message):
    path = make(tmp_path / "d", files)
    before = snapshot(path)
    with pytest.raises(WorkdirError, match=message + ".*Fix"):  # every message ends with the fix
        workdir.check_for_training(path)
    assert snapshot(path) == before


def test_training_refuses_a_file_or_a_path_under_one(tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(WorkdirError, match="f is a file, not a directory. Fix"):
        workdir.check_for_training(str(tmp_path / "f"))
    with pytest.raises(WorkdirError, match="sub lies under .*f, which is a file. Fix"):
        workdir.check_for_training(str(tmp_path / "f" / "sub"))


@pytest.mark.parametrize("files", [
    None, {}, {".lock": "", "tokenizer.json": '{"kind": "byte"}'},  # new, empty, stopped before config.json
    {"config.json": RUN_CONFIG, "tokenizer.json": '{"kind": "byte"}', "checkpoints/2/x": "", "notes.txt": ""},
    {"sweep.log": ""},  # a sweep point's directory: lm.sweep opens the point's log before lm.main starts
])
def test_training_accepts_a_new_or_empty_directory_and_a_run(tmp_path, files):
    path = str(tmp_path / "d")
    if files is not None:
        os.makedirs(path)
        make(path, files)
    workdir.check_for_training(path)


def test_lm_main_on_an_export_exits_2_in_one_line_and_leaves_it_whole(pretrained, tmp_path):
    export = shutil.copytree(pretrained, tmp_path / "export")
    before = snapshot(export)
    result = run_cli("lm.main", CONFIG_FLAG, f"--workdir={export}", *cli_flags(), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lm: error: --workdir={export} is an lm export (it has export.json); a run would write its config.json, "
        "tokenizer.json and checkpoints over or among those files. Fix: pass a new directory as --workdir (or an "
        "lm run's workdir to resume it)."]
    assert snapshot(export) == before


def test_a_new_workdir_whose_mesh_cannot_split_the_vocabulary_is_removed_again(tmp_path):
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for path in (new, empty):
        result = run_cli("lm.main", CONFIG_FLAG, f"--workdir={path}", *cli_flags(),
                         "--config.mesh.shape.tensor=3", "--config.mesh.shape.data=1", check=False)
        assert result.returncode == 2
        assert "3 does not divide" in result.stderr and "Traceback" not in result.stderr
    assert not new.exists()
    assert os.listdir(empty) == []


@pytest.fixture
def run_with_two_checkpoints(tmp_path):
    path = str(tmp_path / "run")
    params = write_run(path, step=3)
    shutil.copytree(os.path.join(path, "checkpoints", "3"), os.path.join(path, "checkpoints", "2"))
    return path, params


def truncate_arrays(step_dir):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(0)


def test_loading_skips_a_damaged_newest_checkpoint_and_names_a_damaged_chosen_one(run_with_two_checkpoints):
    path, params = run_with_two_checkpoints
    truncate_arrays(os.path.join(path, "checkpoints", "3"))
    loaded = artifacts.load(path)
    assert loaded.step == 2
    with pytest.raises(RunError, match=r"the checkpoint at step 3 in .* does not restore .*--step \(one of \[2\]\)"):
        artifacts.load(path, step=3)
    truncate_arrays(os.path.join(path, "checkpoints", "2"))
    with pytest.raises(RunError, match="no checkpoint in .* restores .*step 3: .*step 2: "):
        artifacts.load(path)


def test_loading_names_a_config_json_that_does_not_describe_the_checkpoint(run_with_two_checkpoints):
    path, _ = run_with_two_checkpoints
    config = json.load(open(os.path.join(path, "config.json")))
    config["model"]["d_model"] = 64
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    expected = (r"step 3 .* holds parameters that .*config.json does not describe: params/embed/embedding is "
                r"stored as \(44, 32\) float32, config.json needs \(44, 64\)")
    with pytest.raises(RunError, match=expected):
        artifacts.load(path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: make(d, {"config.json": "{oops"}), r"config.json is not JSON \(Expecting property name"),
    (lambda d: make(d, {"config.json": '{"model_type": "gpt2"}'}), "config.json is a Hugging Face model's config"),
    (lambda d: make(d, {"tokenizer.json": ""}), "tokenizer.json is not JSON"),
    (lambda d: make(d, {"tokenizer.json": '{"version": "1.0"}'}), "tokenizer.json does not describe an lm tokenizer"),
    (lambda d: (os.remove(os.path.join(d, "export.json")), make(d, {"finetune_results.json": "{}", "best/x": ""})),
     "is a fine-tuning workdir .*not a model to load"),
    (lambda d: make(d, {"export.json": '{"step": 0}'}), "export.json lacks a dtype"),
    (lambda d: _edit_config(d, d_model=64), r"config.json does not describe the parameters in .*params: .*needs"),
])
def test_loading_a_damaged_export_names_the_file_and_the_fix(pretrained, tmp_path, damage, message):
    export = str(shutil.copytree(pretrained, tmp_path / "export"))
    damage(export)
    with pytest.raises(RunError, match=message + ".*Fix"):
        artifacts.load(export)


def _edit_config(path, **model):
    config = json.load(open(os.path.join(path, "config.json")))
    config["model"].update(model)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))


def test_an_output_directory_must_be_new_or_empty_and_not_a_file(tmp_path):
    (tmp_path / "f").write_text("data")
    for output, message in ((tmp_path / "f", "is a file, not a directory"), (tmp_path / "f" / "x", "lies under"),
                            (tmp_path, "exists and is not empty")):
        with pytest.raises(RunError, match=message + ".*Fix"):
            artifacts.check_new_directory(str(output))
    (tmp_path / "empty").mkdir()
    artifacts.check_new_directory(str(tmp_path / "empty"))


def test_an_export_made_meanwhile_by_another_process_is_never_replaced(tmp_path):
    output = tmp_path / "export"

    def fill(staging):
        (output / "params").mkdir(parents=True)  # another export finishes first
        open(os.path.join(staging, "mine"), "w").close()

    with pytest.raises(RunError, match="written by another process.*Fix"):
        artifacts.publish_directory(str(output), fill)
    assert os.listdir(output) == ["params"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging directory left


def test_stale_temporaries_of_dead_writers_on_this_host_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead_pid = atomic.socket.gethostname(), dead.stdout.strip()
    stale = [f"out.partial-{host}-{dead_pid}", f"out.tmp-{host}-{dead_pid}"]
    kept = [f"out.partial-{host}-{os.getppid()}", f"out.tmp-otherhost-{dead_pid}", f"out.old-{host}-{dead_pid}"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
    atomic.write_directory(str(tmp_path / "out"), lambda staging: None, replace=False)
    # a moved-aside copy of a dead writer goes only once `out` exists again: now
    assert sorted(os.listdir(tmp_path)) == sorted(["out", *kept[:2], kept[2]])
    atomic.write_text(str(tmp_path / "out.json"), "{}")
    atomic.remove_stale(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "out.json", *kept[:2]])


def write_hf_dir(path, config: dict | str, weights: bytes | None = None, tokenizer: str | None = None) -> str:
    from safetensors.numpy import save_file

    make(path, {"config.json": config if isinstance(config, str) else json.dumps(config)})
    if weights is None:
        save_file({"x": np.zeros(2, np.float32)}, os.path.join(path, "model.safetensors"))
    else:
        (path / "model.safetensors").write_bytes(weights)
    if tokenizer is not None:
        make(path, {"tokenizer.json": tokenizer})
    return str(path)


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
         "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}


@pytest.mark.parametrize("config, weights, tokenizer, message", [
    ("{oops", None, None, r"hf/config.json is not JSON"),
    (LLAMA, b"\x08\x00\x00", None, r"model.safetensors is not a readable safetensors file \(SafetensorError"),
    ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, None, None, "config.json lacks 'hidden_size'"),
    (LLAMA, None, "garbage", "tokenizer.json is not JSON"),
])
def test_a_damaged_hugging_face_checkpoint_names_the_file(tmp_path, config, weights, tokenizer, message):
    hf_dir = write_hf_dir(tmp_path / "hf", config, weights, tokenizer)
    with pytest.raises(UsageError, match=message + ".*Fix"):
        convert.import_hf(hf_dir, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_flag_naming_a_directory_is_refused(tmp_path):
    hf_dir = write_hf_dir(tmp_path / "hf", LLAMA)
    with pytest.raises(UsageError, match="is a directory, not a JSON file.*Fix"):
        convert.hf_tokenizer(hf_dir, LLAMA, hf_dir)
