"""Configs: every recipe validates, and bad input fails up front with the field and the fix."""

import ast
import os

import jax
import pytest
from helpers import REPO, cli_flags, run_cli, tiny_config

from lm import config as config_lib
from lm.config import schema
from lm.configs import base, shakespeare_char
from lm.data import corpora
from lm.errors import UsageError
from lm.parallel import runtime, sharding


def test_base_and_recipe_validate():
    config_lib.validate(base.get_config())
    config_lib.validate(shakespeare_char.get_config())


def test_recipe_has_nanogpt_cpu_settings():
    c = shakespeare_char.get_config()
    assert (c.model.num_layers, c.model.num_heads, c.model.d_model, c.data.seq_len) == (4, 4, 128, 64)
    assert (c.train.batch_size, c.train.steps, c.train.eval_every) == (12, 2000, 250)
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.final_lr, c.optim.schedule) == (1e-3, 100, 1e-4, "cosine")
    assert (c.optim.weight_decay, c.optim.grad_clip, c.model.dropout) == (0.1, 1.0, 0.0)


def test_d_model_not_divisible_by_heads_names_both_and_the_fix():
    config = tiny_config(model__d_model=30, model__num_heads=4)
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.d_model=30 is not divisible by "
                                                     r"config\.model\.num_heads=4.*Fix:"):
        config_lib.validate(config)


def test_unknown_field_is_rejected_with_a_suggestion():
    config = base.get_config()
    with pytest.raises(AttributeError, match='Did you mean "steps"'):
        config.train.stepz = 5


def test_missing_corpus_file_names_the_path():
    config = tiny_config(data__files=("/no/such/corpus.txt",))
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.files.*/no/such/corpus\.txt.*Fix:"):
        config_lib.validate(config)


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.schedule='cosin'.*'cosine'"):
        config_lib.validate(tiny_config(optim__schedule="cosin"))


def test_mesh_that_does_not_match_the_devices_names_both_numbers():
    config = tiny_config()
    config.mesh.shape.data = 3
    with pytest.raises(sharding.MeshError, match=r"data=3 x fsdp=1 x tensor=1\) needs 3 devices, but 8"):
        sharding.make_mesh(config, jax.devices())


def test_batch_not_divisible_by_the_data_axes_names_both_numbers():
    config = tiny_config(train__batch_size=12)
    mesh = sharding.make_mesh(config, jax.devices())  # data=8
    with pytest.raises(sharding.MeshError, match=r"train\.batch_size=12 is not divisible by the 8 batch"):
        sharding.check_batch_sizes(config, mesh)


def test_cpu_devices_default_to_cores_that_divide_the_batch():
    config = tiny_config(train__batch_size=12, eval__batch_size=64)
    assert runtime.cpu_device_count(config, cores=2) == 2
    assert runtime.cpu_device_count(config, cores=8) == 4  # 8, 7, 6, 5 do not divide both 12 and 64
    config.mesh.shape.update(dict(data=2, fsdp=4, tensor=1))
    assert runtime.cpu_device_count(config, cores=2) == 8  # a fixed mesh needs its own size


@pytest.mark.parametrize("flags, expected", [
    (["--config.model.d_model=33"], "config.model.d_model=33 is not divisible by config.model.num_heads=2"),
    (["--config.train.stepz=5"], "--config.train.stepz: the config has no field 'stepz'. Fix: did you mean 'steps'?"),
    (["--config.data.files=('/no/such/corpus.txt',)"],
     "config.data.files='/no/such/corpus.txt' matches no corpus file"),
    (["--config.mesh.shape.data=3", "--config.mesh.cpu_devices=2"], "needs 3 devices, but 2 are available"),
    (["--workdir=gs://bucket/run"], "--workdir=gs://bucket/run is a URL"),
    (["--coordinator_address=127.0.0.1:9999"], "--num_processes --process_id missing"),
    (["--config.mesh.pipeline_repeats=1.5"], "--config.mesh.pipeline_repeats=1.5: invalid literal for int() with "
                                             "base 10: '1.5'. Fix: give that field a whole number."),
])
def test_cli_fails_before_training_with_one_clear_message(tmp_path, flags, expected):
    workdir = tmp_path / "run"
    result = run_cli("lm.main", f"--config={os.path.join(REPO, 'configs', 'shakespeare_char.py')}",
                     f"--workdir={workdir}", *cli_flags(), *flags, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Fix" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


@pytest.mark.parametrize("name, content, flags, expected", [
    ("bad.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n', [], 'bad.jsonl:2 has no string field "text"'),
    ("latin.txt", "caf\u00e9\n".encode("latin-1") * 50, [], "latin.txt is not valid UTF-8 (line 1, byte 3"),
    ("empty.txt", b"\n   \n\n", [], "survived cleaning"),
    ("small.txt", b"to be or not to be, that is the question\n" * 200,
     ["--config.data.tokenizer=sentencepiece", "--config.data.sentencepiece.vocab_size=50000"],
     "more than this corpus supports. Fix: set the vocab size to at most"),
], ids=["jsonl_without_text", "not_utf8", "empty", "vocab_too_large"])
def test_cli_rejects_a_bad_corpus_with_one_message(tmp_path, name, content, flags, expected):
    (tmp_path / name).write_bytes(content)
    result = run_cli("lm.main", f"--config={os.path.join(REPO, 'configs', 'shakespeare_char.py')}",
                     f"--workdir={tmp_path / 'run'}", *cli_flags(), f"--config.data.files=('{tmp_path / name}',)",
                     f"--config.data.name={name.split('.')[0]}", *flags, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Fix" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_recipe_takes_an_argument_from_the_command_line(tmp_path):
    gpu = shakespeare_char.get_config("gpu")
    config_lib.validate(gpu)
    assert (gpu.model.num_layers, gpu.model.d_model, gpu.data.seq_len, gpu.model.dropout) == (6, 384, 256, 0.2)
    result = run_cli("lm.main", f"--config={os.path.join(REPO, 'configs', 'shakespeare_char.py')}:tpu",
                     f"--workdir={tmp_path}", check=False)
    assert result.returncode == 2
    assert "unknown variant 'tpu'" in result.stderr and "shakespeare_char.py:gpu" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_recipe_that_raises_is_one_line_with_its_own_message():
    from lm.config.flags import _flag_error

    text = ("flag --config=configs/r.py:tpu: Error whilst parsing config file:\n\nTraceback (most recent call "
            "last):\n  File \"configs/r.py\", line 3, in get_config\n    raise ValueError(...)\n"
            "ValueError: unknown variant 'tpu'; use one of cpu, gpu\n")
    assert _flag_error(text, ["lm/main.py"]) == (
        "--config=configs/r.py:tpu: the recipe raised ValueError: unknown variant 'tpu'; use one of cpu, gpu. "
        "Fix: follow the recipe's message, or check the argument after ':' against get_config in configs/r.py.")


def test_a_recipe_returning_none_says_so_not_that_config_is_missing(tmp_path):
    recipe = tmp_path / "none_recipe.py"
    recipe.write_text("def get_config():\n    config = 1\n")
    result = run_cli("lm.prepare", f"--config={recipe}", check=False)
    assert result.returncode == 2
    assert result.stderr == (f"lm: error: --config={recipe}: the recipe's get_config() returned None, not a config. "
                             f"Fix: end get_config() in {recipe} with `return config`.\n")


@pytest.mark.parametrize("field, value", [
    ("optim.lr", float("nan")), ("optim.lr", float("inf")), ("optim.final_lr", float("-inf")),
    ("model.rope_theta", float("nan")), ("optim.eps", float("nan")), ("model.dropout", float("nan")),
    ("data.filters.max_non_alpha_fraction", float("nan")), ("sweep.budget", float("inf"))])
def test_a_non_finite_float_is_refused_naming_the_field(field, value):
    config = tiny_config(**{field.replace(".", "__"): value})
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.{field}={value!r} is not a finite number\. Fix:"):
        config_lib.validate(config)


def test_a_non_finite_float_inside_a_tuple_of_dicts_is_named_by_its_index():
    config = tiny_config(model__family="encoder_decoder", objective__name="mixture", objective__extra_ids=100)
    config.objective.mixture.denoisers = (dict(kind="span_corruption", task="[NLU]", weight=float("inf")),)
    with pytest.raises(config_lib.ConfigError, match=r"config\.objective\.mixture\.denoisers\[0\]\.weight=inf"):
        config_lib.validate(config)


@pytest.mark.parametrize("overrides, message", [
    (dict(optim__groups__norm__weight_decay=-2.0), r"config\.optim\.groups\.norm\.weight_decay=-2\.0 must be >= 0, "
     r"or -1, which means optim\.weight_decay \(here 0\.1\)\. Fix: set it >= 0 \(0 for no decay of the norm group\), "
     r"or -1\.$"),
    (dict(optim__name="schedule_free_adamw", optim__schedule="constant", optim__b1=0.0),
     r"config\.optim\.b1=0\.0 does not suit optim\.name='schedule_free_adamw'.*Fix: use optim\.b1 in \(0, 1\), "
     r"e\.g\. 0\.9\.$"),
    (dict(train__steps=40, train__branch_from="/x"), r"config\.train\.branch_step=0 must be a step from 1 to "
     r"train\.steps-1=39 when train\.branch_from is set \('/x'\)\. Fix: "),
    (dict(train__steps=40, train__branch_step=4), r"config\.train\.branch_step=4 is set but train\.branch_from is "
     r"not\. Fix: set train\.branch_from"),
])
def test_an_optimizer_or_branch_field_names_its_allowed_values_and_only_its_own_fix(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=rf"^{message}") as refused:
        config_lib.validate(tiny_config(**overrides))
    assert "schedule=constant" not in str(refused.value)  # a fix for what is set already misleads


@pytest.mark.parametrize("steps", [0, -5])
def test_train_steps_that_are_not_positive_are_named_before_the_schedule(steps):
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.train\.steps={steps} must be positive"):
        config_lib.validate(tiny_config(train__steps=steps))


@pytest.mark.parametrize("objective, family, needs", [
    ("masked_lm", "decoder", "'encoder'"), ("span_corruption", "decoder", "'encoder_decoder'"),
    ("mixture", "encoder", "'encoder_decoder' or 'decoder'")])
def test_an_objective_that_does_not_fit_the_model_family_fails_validation(objective, family, needs):
    config = tiny_config(objective__name=objective, model__family=family)
    with pytest.raises(config_lib.ConfigError, match=rf"config\.objective\.name='{objective}' does not fit "
                                                     rf"config\.model\.family='{family}': it needs {needs}.*Fix"):
        config_lib.validate(config)


@pytest.mark.parametrize("objective, family, needed", [("masked_lm", "encoder", 1),
                                                        ("span_corruption", "encoder_decoder", 1),
                                                        ("mixture", "encoder_decoder", 3 + 3),
                                                        ("mixture", "decoder", 3 + 2)])
def test_an_objective_without_room_for_its_extra_ids_fails_validation(objective, family, needed):
    config = tiny_config(objective__name=objective, model__family=family)
    with pytest.raises(config_lib.ConfigError, match=rf"config\.objective\.extra_ids=0 leaves no room.*Fix: set "
                                                     rf"config\.objective\.extra_ids={needed}"):
        config_lib.validate(config)
    config.objective.extra_ids = needed
    config_lib.validate(config)


@pytest.mark.parametrize("denoiser, problem", [
    (dict(kind="electra", task="[E]"), r"has kind 'electra'.*Fix: use one of \('span_corruption', 'prefix_lm'\)"),
    (dict(kind="span_corruption", task="[R]", noise_density=1.5), r"is out of range.*0 < noise_density < 1"),
    (dict(kind="prefix_lm", task="[S]", span=3), r"has unknown keys \['span'\].*Fix: give a dict"),
])
def test_a_bad_mixture_denoiser_fails_validation_naming_its_index(denoiser, problem):
    config = tiny_config(objective__name="mixture", model__family="encoder_decoder", objective__extra_ids=20)
    config.objective.mixture.denoisers = (dict(kind="span_corruption", task="[R]"), denoiser)
    with pytest.raises(config_lib.ConfigError, match=r"config\.objective\.mixture\.denoisers\[1\]=.*" + problem):
        config_lib.validate(config)


def test_a_mixture_needs_stream_packing():
    config = tiny_config(objective__name="mixture", model__family="decoder", objective__extra_ids=20,
                         data__packing="pack")
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.packing='pack' is not supported by "
                                                     r"objective 'mixture'.*Fix: use config\.data\.packing='stream'"):
        config_lib.validate(config)


@pytest.mark.parametrize("symbols, problem", [
    (("</s>",), r"has '</s>', a piece lm's SentencePiece models reserve"),
    (("<sep>", "<pad>"), r"has '<pad>', a piece lm's SentencePiece models reserve"),
    (("<eos>",), r"has '<eos>', a piece lm's SentencePiece models reserve"),
    (("<unk>",), r"has '<unk>', a piece lm's SentencePiece models reserve"),
    (("<0x41>",), r"has '<0x41>', a piece lm's SentencePiece models reserve"),
    (("",), r"has '': a symbol is kept whole as text only if it is non-empty"),
    (("a b",), r"has 'a b': .*holds no whitespace"),
    (("\u2581a",), r"has '\u2581a': .*holds no whitespace \(nor '\u2581'"),
    (("<sep>", "<sep>"), r"repeats a symbol"),
])
def test_sentencepiece_user_defined_symbols_are_checked_before_training(symbols, problem):
    config = tiny_config(data__tokenizer="sentencepiece", data__sentencepiece__user_defined_symbols=symbols)
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.sentencepiece\.user_defined_symbols=.*"
                                                     + problem + r".*Fix: "):
        config_lib.validate(config)
    config.data.sentencepiece.user_defined_symbols = ("<sep>", "[X]", "<s>")  # names of the user's own are text
    config_lib.validate(config)


def test_cli_names_user_defined_symbols_not_the_vocab_size_for_a_reserved_piece(tmp_path):
    result = run_cli("lm.main", f"--config={os.path.join(REPO, 'configs', 'shakespeare_char.py')}",
                     f"--workdir={tmp_path / 'run'}", *cli_flags(), "--config.data.tokenizer=sentencepiece",
                     "--config.data.sentencepiece.user_defined_symbols=('</s>',)", check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm: error:")]
    assert len(errors) == 1 and "config.data.sentencepiece.user_defined_symbols=('</s>',)" in errors[0], result.stderr
    assert "vocab_size" not in errors[0] and "INTERNAL" not in result.stderr and "Traceback" not in result.stderr


def _names(node: ast.expr) -> str:
    """The name an exception expression ends in: `ConfigError`, `config_lib.ConfigError(...)`."""
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def test_config_error_is_raised_and_defined_only_under_lm_config():
    """A ConfigError says "this config cannot run"; a workdir, checkpoint or table error
    has its own UsageError subclass, so only lm/config/ raises ConfigError."""
    raised, defined = {}, {}
    for root, dirs, files in os.walk(os.path.join(REPO, "lm")):
        dirs[:] = [d for d in dirs if d not in ("configs", "__pycache__")]  # configs: a worktree's link to recipes
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.relpath(os.path.join(root, name), REPO)
            with open(os.path.join(REPO, path), encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Raise) and node.exc is not None and _names(node.exc) == "ConfigError":
                    raised[path] = raised.get(path, 0) + 1
                if isinstance(node, ast.ClassDef) and (node.name == "ConfigError"
                                                       or "ConfigError" in map(_names, node.bases)):
                    defined[path] = node.name
    assert raised, "found no `raise ConfigError` at all: the walk is looking in the wrong place"
    assert {p for p in raised if not p.startswith(os.path.join("lm", "config") + os.sep)} == set(), raised
    assert defined == {os.path.join("lm", "config", "checks.py"): "ConfigError"}
    assert issubclass(config_lib.ConfigError, UsageError)


def test_the_schema_lives_in_lm_config_and_recipes_reach_it_through_configs_base():
    assert base.get_config is schema.get_config and base.DEFAULT_RULES is schema.DEFAULT_RULES
    # The schema finds the embedded corpus without importing lm.data (it sits below it).
    assert schema.get_config().data.files == (corpora.path("tinyshakespeare"),)
    assert os.path.isfile(schema.get_config().data.files[0])
