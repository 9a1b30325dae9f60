"""Hugging Face interop: tiny random `transformers` models, saved locally, imported into
`lm`, compared logit for logit, and exported back without loss."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from lm import convert
from lm.errors import UsageError
from lm.interop import huggingface
from lm.runs import artifacts
from tests.helpers import run_cli
from tests.hf_models import TINY_MODELS, VOCAB, hf_logits, lm_logits, save_hf_model, torch, transformers

pytestmark = pytest.mark.interop

@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_an_imported_model_gives_transformers_logits_and_exports_back_bit_for_bit(kind, tmp_path):
    hf_dir, lm_dir, back_dir = (str(tmp_path / d) for d in ("hf", "lm", "back"))
    model = save_hf_model(kind, hf_dir)
    tokens_BL = np.random.default_rng(0).integers(0, VOCAB, (2, 40))

    convert.import_hf(hf_dir, lm_dir)
    np.testing.assert_allclose(lm_logits(lm_dir, tokens_BL), hf_logits(model, tokens_BL), atol=1e-4, rtol=0)

    convert.export_hf(lm_dir, back_dir)
    original, exported = load_file(f"{hf_dir}/model.safetensors"), load_file(f"{back_dir}/model.safetensors")
    assert sorted(exported) == sorted(original)
    for name in original:
        assert np.array_equal(original[name], exported[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back_dir).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens_BL), hf_logits(model, tokens_BL))

    convert.import_hf(back_dir, str(tmp_path / "again"))
    jax.tree.map(np.testing.assert_array_equal, artifacts.load(lm_dir).params,
                 artifacts.load(str(tmp_path / "again")).params)


def test_an_imported_model_samples_what_transformers_generates_greedily(tmp_path):
    model = save_hf_model("gpt2", str(tmp_path / "hf"))
    result = run_cli("lm.convert", "import", f"--hf_dir={tmp_path}/hf", f"--output={tmp_path}/lm")
    assert "imported gpt2: " in result.stdout
    tokenizer = artifacts.load(str(tmp_path / "lm")).tokenizer
    assert tokenizer.decode(tokenizer.encode("To be, or not to be")) == "To be, or not to be"

    sample = run_cli("lm.sample", f"--workdir={tmp_path}/lm", "--prompt=ROMEO:", "--max_new_tokens=8",
                     "--temperature=0")
    prompt = torch.from_numpy(tokenizer.encode("ROMEO:")).long()[None]
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert sample.stdout.splitlines()[1:] == tokenizer.decode(greedy[0].numpy()).splitlines()


def test_a_scanned_lm_model_exports_like_its_unrolled_twin(tmp_path):
    save_hf_model("llama_gqa", str(tmp_path / "hf"))
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    loaded = artifacts.load(str(tmp_path / "lm"))
    stacked = {k: v for k, v in loaded.params.items() if not k.startswith("layer_")}
    stacked["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *(loaded.params[f"layer_{i}"] for i in range(2)))
    assert jax.tree.all(jax.tree.map(np.array_equal, convert.unstack_layers(stacked, 2), loaded.params))


def test_bad_checkpoints_fail_with_the_problem_and_the_fix(tmp_path):
    save_hf_model("gpt2", str(tmp_path / "hf"))
    with open(tmp_path / "hf/config.json", encoding="utf-8") as f:
        hf_config = json.load(f)

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = run_cli("lm.convert", "import", f"--hf_dir={tmp_path}/bert", f"--output={tmp_path}/x", check=False)
    assert result.returncode == 2
    assert "model_type 'bert'" in result.stderr and "Fix: convert one of ['gpt2', 'llama', 'mistral']" in result.stderr
    assert not os.path.exists(tmp_path / "x")

    hf_config["n_embd"] = 64  # the weights are 32 wide
    (tmp_path / "hf/config.json").write_text(json.dumps(hf_config))
    with pytest.raises(UsageError, match=r"transformer.wte.weight.*shape \(300, 32\).*needs \(300, 64\)"):
        convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "wide"))

    hf_config.update(n_embd=32, activation_function="relu")
    (tmp_path / "hf/config.json").write_text(json.dumps(hf_config))
    with pytest.raises(UsageError, match="activation_function='relu'.*Fix"):
        convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "relu"))

    (tmp_path / "hf/tokenizer.json").unlink()
    hf_config["activation_function"] = "gelu_new"
    (tmp_path / "hf/config.json").write_text(json.dumps(hf_config))
    with pytest.raises(UsageError, match="tokenizer.json does not exist.*--tokenizer"):
        convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "notok"))


def test_only_gpt2_or_llama_shaped_models_export_and_the_message_says_which_field_differs():
    from lm.configs import shakespeare_char

    model = shakespeare_char.get_config().model
    with pytest.raises(UsageError, match=r"as gpt2: model.positions='rope'.*model.use_bias=False.*"
                       r"as llama: model.norm='layernorm'.*model.activation='gelu'"):
        huggingface.exportable_architecture(model)
    model.update(norm="rmsnorm", activation="swiglu")
    assert huggingface.exportable_architecture(model).model_type == "llama"
