"""Resuming a workdir with another config: which fields may change (lm.config.RESUME),
one clear refusal for the others, and commands that read checkpoints print only their
own messages."""

import gzip
import json
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp
import pytest
from helpers import cli_flags, run_cli, tiny_config
from test_end_to_end import CONFIG

from lm import config as config_lib
from lm.configs import base
from lm.errors import UsageError
from lm.model import ModelConfig
from lm.parallel import sharding
from lm.runs import checkpoint
from lm.training.setup import check_state_fits, corpus_fingerprints
from lm.training.trainer import make_trainer

# A GPT-2-shaped tiny run (learned positions, biases), so `lm.convert export` accepts it.
RUN = dict(model__positions="learned", model__use_bias=True, train__checkpoint_every=2)
# absl's log lines (W1130 02:03:28.75 ... file.py:12]), Python's logging.warning from
# absl, and the asyncio noise of a failed orbax restore: none belongs in a healthy output.
# Library chatter; lm's own warnings ("...] lm: ...") say something to the user and may appear.
NOISE = re.compile(r"^[IWEF]\d{4} (?!.*\] lm: )|WARNING:absl|checkpoint_manager|orbax|Event loop is closed|Traceback",
                   re.M)


def config_json(**overrides) -> dict:
    return json.loads(tiny_config(**overrides).to_json_best_effort())


def tree_bytes(directory) -> dict[str, bytes]:
    """Every file under `directory`, by relative path, with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_every_config_field_is_classified_for_resuming():
    fields = config_lib.config_fields(json.loads(base.get_config().to_json_best_effort()))
    assert set(fields) - set(config_lib.RESUME) == set(), "classify the new field in lm.config.RESUME"
    assert set(config_lib.RESUME) - set(fields) == set(), "RESUME names a field lm/config/schema.py no longer has"
    assert all(rule.reason for rule in config_lib.RESUME.values())


def test_fields_that_change_the_state_or_the_data_are_refused_with_old_and_new_values():
    saved = config_json()
    changed = config_json(model__d_model=64, model__num_layers=3, model__scan_layers=True, objective__z_loss=1e-4,
                          data__tokenizer="byte", data__unit="paragraph", train__batch_size=4, seed=1)
    conflicts = config_lib.resume_conflicts(saved, changed)
    assert [c.split(" was ")[0] for c in conflicts] == [
        "config.data.tokenizer", "config.data.unit", "config.model.d_model", "config.model.num_layers",
        "config.model.scan_layers", "config.objective.z_loss", "config.seed", "config.train.batch_size"]
    assert "config.model.d_model was 32, now 64 (" in conflicts[2]
    assert "config.model.scan_layers was False, now True (" in conflicts[4]


def test_the_mesh_steps_schedule_and_cadence_may_change_on_resume():
    changed = config_json(train__steps=60, train__eval_every=5, train__log_every=1, train__checkpoint_every=3,
                          train__keep_checkpoints=9, eval__batch_size=4, optim__lr=3e-4, optim__warmup_steps=5,
                          optim__grad_clip=0.5, model__remat="full", model__dtype="bfloat16",
                          train__microbatches=2, mesh__cpu_devices=2)
    changed["mesh"]["shape"] = dict(data=1, fsdp=2, tensor=1)
    assert config_lib.resume_conflicts(config_json(), changed) == []


def test_a_zero_default_spelled_out_is_no_change_but_a_different_value_is():
    spelled_out = config_json(model__head_dim=16, model__num_kv_heads=2, model__d_ff=128)  # d_model 32, 2 heads
    assert config_lib.resume_conflicts(config_json(), spelled_out) == []
    conflicts = config_lib.resume_conflicts(config_json(), config_json(model__head_dim=8, model__num_kv_heads=1))
    assert [c.split(" (")[0] for c in conflicts] == ["config.model.head_dim was 0, now 8",
                                                      "config.model.num_kv_heads was 0, now 1"]


def test_turning_gradient_clipping_off_is_refused_as_it_changes_the_optimizer_state_tree():
    conflicts = config_lib.resume_conflicts(config_json(), config_json(optim__grad_clip=0.0))
    assert len(conflicts) == 1 and conflicts[0].startswith("config.optim.grad_clip was 1.0, now 0.0 (")


def test_groups_may_change_rates_but_not_split_or_merge_their_optimizers():
    """One optimizer for every group and one per group hold different states (the trial's
    resume with only the embedding's lr_scale changed failed on 112 arrays' paths)."""
    mixed = config_json(optim__groups__embedding__lr_scale=0.5)
    for saved, new in ((config_json(), mixed), (mixed, config_json())):
        conflicts = config_lib.resume_conflicts(saved, new)
        assert len(conflicts) == 1 and conflicts[0].startswith("config.optim.groups gave "), conflicts
    assert config_lib.resume_conflicts(mixed, config_json(optim__groups__embedding__lr_scale=0.25)) == []
    muon = dict(optim__name="muon")  # Muon's matrices are apart: their rate may differ from the rest's
    faster_matrices = config_json(**muon, optim__groups__matrix__lr_scale=20.0)
    assert config_lib.resume_conflicts(config_json(**muon), faster_matrices) == []
    assert config_lib.resume_conflicts(config_json(), config_json(optim__weight_decay=0.05)) == []


def test_a_field_the_checkpoint_predates_counts_as_its_default():
    saved = config_json()
    del saved["model"]["scan_layers"], saved["sweep"]  # a checkpoint written before these fields existed
    assert config_lib.resume_conflicts(saved, config_json()) == []
    assert len(config_lib.resume_conflicts(saved, config_json(model__scan_layers=True))) == 1


def test_the_corpus_is_the_same_in_any_encoding_of_its_text_and_another_when_edited(tmp_path):
    text = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n"
    lf, crlf, gz, edited = (tmp_path / name for name in ("lf.txt", "crlf.txt", "copy.txt.gz", "edited.txt"))
    lf.write_text(text, newline="")
    crlf.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    gz.write_bytes(gzip.compress(text.encode("utf-16")))
    edited.write_text(text + "Speak.\n", newline="")
    record = lambda path: corpus_fingerprints(tiny_config(data__files=(str(path),)))
    assert record(lf) == record(crlf) == record(gz) != record(edited)


def test_a_stored_state_of_other_shapes_is_described_by_path_without_a_restore(tmp_path):
    def trainer(d_model):
        config = tiny_config(model__d_model=d_model)
        config.mesh.shape.update(dict(data=1, fsdp=1, tensor=1))
        return make_trainer(config, ModelConfig.from_config(config.model, 64, 16),
                            sharding.make_mesh(config, jax.devices()[:1]), pad_id=0)

    saved = trainer(32)
    with ocp.StandardCheckpointer() as saver:  # closing waits for the save
        saver.save(tmp_path / "1" / "state", saved.init())
    reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
    assert reader.state_mismatches(1, saved.abstract_state()) == []
    mismatches = reader.state_mismatches(1, trainer(64).abstract_state())
    assert "params/embed/embedding is stored as (64, 32) float32, this config needs (64, 64) float32" in mismatches
    assert mismatches[-1].startswith("and ") and mismatches[-1].endswith(" more")
    for branch_step in (None, 1):  # a resume's newest checkpoint; a new branch's parent's
        with pytest.raises(UsageError, match=r"the checkpoint at step 1 in .* holds a train state that this config's "
                                             r"does not match: params/embed/embedding is stored as \(64, 32\)"):
            check_state_fits(trainer(64).abstract_state(), str(tmp_path), branch_step)
    check_state_fits(saved.abstract_state(), str(tmp_path), None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 6 steps with checkpoints at 2, 4 and 6 (only read; tests copy it)."""
    workdir = tmp_path_factory.mktemp("resume") / "run"
    run_cli("lm.main", CONFIG, f"--workdir={workdir}", *cli_flags(**RUN))
    return workdir


@pytest.mark.slow
def test_a_rerun_with_a_changed_model_exits_2_with_one_line_naming_each_field_and_touches_nothing(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = tree_bytes(workdir)
    result = run_cli("lm.main", CONFIG, f"--workdir={workdir}", *cli_flags(
        **RUN, model__d_model=64, model__num_layers=3, model__scan_layers=True), check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) < 10 and [line for line in lines if line.startswith("lm: error:")] == lines, result.stderr
    for field, old, new in (("d_model", 32, 64), ("num_layers", 2, 3), ("scan_layers", False, True)):
        assert f"config.model.{field} was {old}, now {new} (" in result.stderr
    assert not NOISE.search(result.stderr) and "does not restore" not in result.stderr
    assert tree_bytes(workdir) == {**before, ".lock": tree_bytes(workdir)[".lock"]}  # config.json included


@pytest.mark.slow
def test_a_rerun_with_fewer_steps_than_its_newest_checkpoint_exits_2_naming_both_and_touches_nothing(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = tree_bytes(workdir)
    result = run_cli("lm.main", CONFIG, f"--workdir={workdir}", *cli_flags(**{**RUN, "train__steps": 4}), check=False)
    assert result.returncode == 2, result.stderr
    assert ("holds a checkpoint at step 6, past config.train.steps=4" in result.stderr
            and "Fix: set --config.train.steps >= 6" in result.stderr), result.stderr
    assert tree_bytes(workdir) == {**before, ".lock": tree_bytes(workdir)[".lock"]}  # config.json included


@pytest.mark.slow
def test_a_rerun_on_another_mesh_with_more_steps_resumes(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    result = run_cli("lm.main", CONFIG, f"--workdir={workdir}", *cli_flags(
        **RUN, train__steps=8, mesh__cpu_devices=2, mesh__shape__fsdp=2, train__eval_every=1, optim__lr=5e-4))
    assert "2 cpu devices, mesh data=1 x fsdp=2 x tensor=1" in result.stdout
    assert "resuming from the checkpoint at step 6" in result.stdout
    assert "lm: resuming at step 6 at a learning rate of 0.0002, where the checkpoint's run" in result.stderr
    assert sorted(map(int, os.listdir(workdir / "checkpoints"))) == [4, 6, 8]
    assert not NOISE.search(result.stderr), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ("lm.convert", "export", "--output={tmp}/hf"),
    ("lm.export", "--output={tmp}/export"),
    ("lm.evaluate", "--split=validation", "--max_windows=2"),
    ("lm.sample", "--max_new_tokens=4"),
], ids=lambda c: " ".join(c[:2]))
def test_commands_that_read_a_checkpoint_print_no_orbax_or_absl_warnings(trained, tmp_path, command):
    module, *args = command
    result = run_cli(module, f"--workdir={trained}", *(a.format(tmp=tmp_path) for a in args))
    assert result.stdout.strip()
    assert not NOISE.search(result.stderr) and not NOISE.search(result.stdout), result.stderr
