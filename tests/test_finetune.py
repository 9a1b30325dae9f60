"""Fine-tuning: what each method trains, LoRA's merge, freezing, layerwise rates, task
encodings, early stopping and the comparison CLI, on a tiny (untrained) Shakespeare model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import ConfigError
from lm.configs.finetune import base as finetune_base
from lm.data import tokenizers
from lm.errors import UsageError
from lm.finetuning import loop, lora, optim, tasks
from lm.finetuning import workdir as workdir_lib
from lm.model import ModelConfig, build
from lm.runs import artifacts
from lm.runs.workdir import WorkdirError
from tests.helpers import run_cli


def speaker_config(pretrained: str, **finetune):
    config = finetune_base.get_config()
    config.init_from = pretrained
    config.task.builder = "shakespeare_speakers"
    config.task.speakers = ("ROMEO", "MENENIUS")
    config.task.seq_len = 48
    config.finetune.update(dict(steps=6, batch_size=8, eval_every=3, warmup_steps=1, dropout=0.0), **finetune)
    return config


def train_steps(setup: loop.Setup, steps: int):
    """The fine-tuning train step `steps` times; returns the whole parameter tree."""
    trainable, frozen = optim.partition(setup.params, setup.mask)
    trainable = jax.tree.map(jnp.array, trainable)
    optimizer, train_step, _ = loop.make_steps(setup)
    opt_state = optimizer.init(trainable)
    for step in range(steps):
        batch = setup.splits["train"].batch(np.arange(step * 8, step * 8 + 8))
        trainable, opt_state, _ = train_step(trainable, opt_state, frozen, batch, jax.random.key(step))
    return optim.combine(trainable, frozen)


def changed(before, after) -> dict[str, bool]:
    flat_before = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(before)[0]}
    flat_after = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(after)[0]}
    return {k: not np.array_equal(flat_before[k], flat_after[k]) for k in flat_before}


def test_lora_trains_only_the_adapters_and_head_and_its_merge_equals_the_adapted_model(pretrained):
    config = speaker_config(pretrained, method="lora")
    config.finetune.lora.learning_rate = 1e-2
    setup = loop.setup(config)
    after = train_steps(setup, 4)

    moved = changed(setup.params["backbone"], after["backbone"])
    assert moved and not any(moved.values())  # every backbone parameter bit-identical
    assert all(changed(setup.params["lora"], after["lora"]).values())
    assert all(changed(setup.params["head"], after["head"]).values())

    tokens_BL = jnp.asarray(setup.splits["validation"].tokens_NL[:4])
    adapted_BLV = build(setup.model_cfg).apply({"params": after["backbone"], "lora": after["lora"]}, tokens_BL)
    plain = build(ModelConfig(**{**setup.model_cfg.__dict__, "lora": None}))
    merged_BLV = plain.apply({"params": lora.merge(after["backbone"], after["lora"], setup.model_cfg)}, tokens_BL)
    assert not np.allclose(adapted_BLV, plain.apply({"params": after["backbone"]}, tokens_BL), atol=1e-3)
    np.testing.assert_allclose(merged_BLV, adapted_BLV, atol=1e-5, rtol=0)


def test_frozen_trains_the_head_alone_and_freeze_keeps_matching_parameters_fixed(pretrained):
    setup = loop.setup(speaker_config(pretrained, method="frozen"))
    after = train_steps(setup, 2)
    assert not any(changed(setup.params["backbone"], after["backbone"]).values())
    assert all(changed(setup.params["head"], after["head"]).values())

    setup = loop.setup(speaker_config(pretrained, method="full", freeze=r"embed|layer_0/"))
    moved = changed(setup.params["backbone"], train_steps(setup, 2)["backbone"])
    assert not any(v for k, v in moved.items() if "embed" in k or "layer_0" in k)
    assert all(v for k, v in moved.items() if "layer_1" in k)


@pytest.mark.finetune
def test_gradual_unfreezing_opens_layers_from_the_top_and_layer_decay_slows_the_bottom(pretrained):
    setup = loop.setup(speaker_config(pretrained, unfreeze_every=2))
    first = changed(setup.params, train_steps(setup, 2))  # steps 0, 1: depth 0 only (head, final norm)
    assert all(v for k, v in first.items() if "head" in k or "final_norm" in k)
    assert not any(v for k, v in first.items() if "layer_" in k or "embed" in k)
    second = changed(setup.params, train_steps(setup, 3))  # step 2: depth 1 (the top layer) opens
    assert all(v for k, v in second.items() if "layer_1" in k)
    assert not any(v for k, v in second.items() if "layer_0" in k)

    depths = {k: optim.depth(k, 2) for k in [("head", "kernel"), ("backbone", "layer_1", "x"),
                                               ("backbone", "layer_0", "x"), ("backbone", "embed", "embedding")]}
    assert [int(d) for d in depths.values()] == [0, 1, 2, 3]
    np.testing.assert_array_equal(optim.depth(("lora", "layers", "a"), 3), [3, 2, 1])


def test_bad_targets_and_regexes_name_the_field_and_the_fix(pretrained):
    with pytest.raises(UsageError, match=r"lora.targets='nothing_here' matches no dense layer.*layer_0/attn/qkv"):
        loop.setup(speaker_config(pretrained, method="lora", lora=dict(rank=4, alpha=8.0, targets="nothing_here")))
    with pytest.raises(UsageError, match="finetune.freeze='nope' matches no backbone parameter"):
        loop.setup(speaker_config(pretrained, freeze="nope"))
    with pytest.raises(UsageError, match="config.init_from is empty"):
        loop.setup(speaker_config(""))
    config = speaker_config(pretrained)
    config.task.speakers = ("ROMEO", "HAMLET")
    with pytest.raises(UsageError, match=r"unknown: \['HAMLET'\]"):
        loop.setup(config)


def test_the_finetuning_recipes_validate():
    from lm.config import validate_finetune
    from lm.configs.finetune import shakespeare_speakers, shakespeare_word_order

    for recipe in (finetune_base, shakespeare_speakers, shakespeare_word_order):
        config = recipe.get_config()
        config.init_from = "runs/shakespeare_char"
        validate_finetune(config)


@pytest.mark.parametrize("field, value, problem", [
    ("finetune.freeze", "layer_[0", "is not a valid regular expression"),
    ("finetune.lora.targets", "attn/(q", "is not a valid regular expression"),
    ("finetune.steps", 0, "must be positive"), ("finetune.batch_size", 0, "must be positive"),
    ("finetune.eval_every", 0, "must be positive"), ("finetune.patience", -1, "must be zero or positive"),
    ("finetune.learning_rate", float("nan"), "is not a finite number"),
    ("finetune.dropout", 1.0, "must lie in"), ("task.pooling", "max", "is not a known choice"),
    ("task.kind", "regression", "is not a known choice"), ("finetune.method", "qlora", "is not a known choice"),
    ("compare", ("full", "bogus"), "has 'bogus', not a method")])
def test_a_bad_finetuning_config_is_refused_before_the_model_loads(field, value, problem):
    config = speaker_config("/no/such/pretrained/run")  # validation comes first: it is never read
    *sections, name = field.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value
    with pytest.raises(ConfigError) as error:
        loop.setup(config)
    assert str(error.value).startswith(f"config.{field}={value!r} {problem}") and ". Fix: " in str(error.value)


def test_a_task_longer_than_the_pretrained_context_is_refused(pretrained):
    config = speaker_config(pretrained)
    config.task.seq_len = 100_000  # a rotary model: 33 TB of attention asked for, before this check
    with pytest.raises(UsageError, match=r"task.seq_len=100000 exceeds the 48-token context.*at most 48"):
        loop.setup(config)


def test_a_workdir_that_is_a_file_a_pretraining_run_or_an_export_is_refused_untouched(pretrained, tmp_path):
    config = speaker_config(pretrained)
    (tmp_path / "file").write_text("x")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"model": {}}')
    cases = {str(tmp_path / "file"): "is a file", str(tmp_path / "file" / "sub"): "lies under",
             str(run): "pretraining run's workdir", pretrained: "is an export"}
    for workdir, problem in cases.items():
        with pytest.raises(WorkdirError, match=problem):
            workdir_lib.check_workdirs(workdir, config)
    with pytest.raises(WorkdirError, match="pretraining run's workdir"):
        loop.finetune(config, str(run))
    assert (run / "config.json").read_text() == '{"model": {}}'


def test_a_rerun_with_another_config_is_refused_naming_the_fields(pretrained, tmp_path):
    first = speaker_config(pretrained)
    (tmp_path / "config.json").write_text(first.to_json_best_effort(indent=2))
    saved = (tmp_path / "config.json").read_text()
    workdir_lib.check_workdirs(str(tmp_path), first)  # the same config: a rerun
    first.compare = ("full",)  # picks methods only: runs in workdir/full
    workdir_lib.check_workdirs(str(tmp_path), first)
    second = speaker_config(pretrained, method="lora", steps=7)
    with pytest.raises(WorkdirError, match=r"config.finetune.method was 'full', now 'lora'; "
                                           r"config.finetune.steps was 6, now 7\)"):
        loop.finetune(second, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved


def test_sft_puts_loss_on_the_response_and_token_tags_on_first_tokens():
    tokenizer = tokenizers.ByteTokenizer()
    split = tasks.encode("sft", [{"prompt": "Q: hi\nA:", "response": " ho"}], tokenizer, 16, [])
    prompt = len("Q: hi\nA:")
    weights = split.weights_NL[0]
    assert weights[:prompt - 1].sum() == 0 and weights[prompt - 1:prompt + 3].tolist() == [1, 1, 1, 1]
    assert tokenizer.decode(split.labels[0][weights == 1]) == " ho"  # eos (id 1) decodes to nothing

    split = tasks.encode("token_classification", [{"words": ["Good", "morrow"], "tags": ["ADJ", "NOUN"]}],
                         tokenizer, 16, ["ADJ", "NOUN"])
    assert split.labels[0][:12].tolist() == [0, -1, -1, -1, 1] + [-1] * 6 + [-1]


@pytest.mark.finetune
def test_finetune_cli_compares_methods_in_a_table_and_stops_early(pretrained, tmp_path):
    flags = [f"--config.init_from={pretrained}", "--config.task.speakers=('ROMEO','MENENIUS')",
             "--config.task.seq_len=48", "--config.finetune.steps=40", "--config.finetune.batch_size=8",
             "--config.finetune.eval_every=2", "--config.finetune.patience=1", "--config.finetune.learning_rate=0.0",
             "--config.finetune.lora.learning_rate=0.0", "--config.finetune.frozen_learning_rate=0.0"]
    result = run_cli("lm.finetune", "--config=configs/finetune/shakespeare_speakers.py",
                     f"--workdir={tmp_path}", *flags)
    table = result.stdout[result.stdout.index("| method"):].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["majority class", "full", "lora", "frozen"]
    assert "early stop at step 4" in result.stdout  # lr 0: the score never improves after the first eval
    for method in ("full", "lora", "frozen"):
        results = json.load(open(os.path.join(tmp_path, method, loop.RESULTS)))
        assert results["best_step"] == 2 and 0 <= results["test"]["accuracy"] <= 1
        assert os.path.exists(os.path.join(tmp_path, method, "best", "best.json"))
    trainable = {m: json.load(open(os.path.join(tmp_path, m, loop.RESULTS)))["trainable_parameters"]
                 for m in ("full", "lora", "frozen")}
    assert trainable["full"] > trainable["lora"] > trainable["frozen"] == 32 * 2 + 2


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.finetune
def test_sft_with_lora_trains_on_jsonl_and_exports_a_merged_model_that_samples(pretrained, tmp_path):
    rows = [{"prompt": f"{name}:\n", "response": line} for name, line in
            [("ROMEO", "But soft, what light"), ("JULIET", "O Romeo, Romeo"), ("HAMLET", "To be, or not")] * 4]
    config = speaker_config(pretrained, method="lora", export_merged=True)
    config.task.update(kind="sft", builder="", train_file=write_jsonl(tmp_path / "train.jsonl", rows),
                       validation_file=write_jsonl(tmp_path / "val.jsonl", rows[:4]))
    results = loop.finetune(config, str(tmp_path / "run"), log=lambda _: None)
    assert results["kind"] == "sft" and results["validation"]["loss"] > 0 and "majority_baseline" not in results
    merged = artifacts.load(str(tmp_path / "run" / "merged"))
    adapters = loop.restore_best(str(tmp_path / "run"), {"lora": loop.setup(config).params["lora"]})
    assert set(adapters) == {"lora"}
    from lm.inference import decode

    text = decode.sample_text(merged.model, merged.params, merged.tokenizer, "ROMEO:\n", max_new_tokens=8,
                              max_len=48, temperature=0.0, top_k=0)
    assert len(text) == 8


@pytest.mark.finetune
def test_token_classification_trains_a_tagger_on_jsonl(pretrained, tmp_path):
    rows = [{"words": ["good", "morrow", "cousin"], "tags": ["ADJ", "NOUN", "NOUN"]},
            {"words": ["sweet", "prince"], "tags": ["ADJ", "NOUN"]}] * 8
    config = speaker_config(pretrained, method="full")
    config.task.update(kind="token_classification", builder="", train_file=write_jsonl(tmp_path / "t.jsonl", rows),
                       validation_file=write_jsonl(tmp_path / "v.jsonl", rows[:4]),
                       test_file=write_jsonl(tmp_path / "test.jsonl", rows[:2]))
    config.finetune.update(learning_rate=3e-3, steps=30, eval_every=10, patience=0)
    results = loop.finetune(config, str(tmp_path / "run"), log=lambda _: None)
    assert results["labels"] == ["ADJ", "NOUN"]
    assert results["majority_baseline"] == pytest.approx(3 / 5)  # NOUN, on the 5 first tokens of the test rows
    assert results["test"]["accuracy"] == 1.0  # learnt: the first word is ADJ, the others NOUN


def test_evaluate_cli_scores_the_runs_own_corpus_split(pretrained):
    result = run_cli("lm.evaluate", f"--workdir={pretrained}", "--split=validation", "--max_windows=8")
    assert "| perplexity/validation | bits_per_byte |" in result.stdout
