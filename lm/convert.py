"""Convert between Hugging Face checkpoints (GPT-2, LLaMA family) and `lm` exports.

    python -m lm.convert import --hf_dir=~/models/gpt2 --output=/tmp/gpt2_lm
    python -m lm.convert export --workdir=/tmp/gpt2_lm --output=/tmp/gpt2_hf

`import` reads a local Hugging Face directory (config.json, model.safetensors or its
shards, tokenizer.json) and writes an `lm` export, which `lm.sample`, `lm.evaluate`,
`lm.finetune` and `lm.runs.load` read. `export` writes a run or export back as a
Hugging Face directory that `transformers`' `from_pretrained` loads, with the run's
tokenizer, whatever its kind, as a tokenizer.json that encodes text to the same ids
(lm.interop.tokenizer_json). Both directions are exact: export then import gives back
the same float32 tensors, bit for bit, and the same token ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags

from lm import runs, runtime, version
from lm.cli import exit_with_error, quiet_logging
from lm.config import ConfigError
from lm.configs import base
from lm.data import tokenizers
from lm.interop import huggingface as hf
from lm.interop import tokenizer_json
from lm.model import ModelConfig, build
from lm.model.counting import abstract_params, param_counts

HF_CONFIG, HF_WEIGHTS, HF_INDEX, HF_TOKENIZER = ("config.json", "model.safetensors", "model.safetensors.index.json",
                                                 "tokenizer.json")
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


def read_hf_checkpoint(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, {name: tensor}) of a local Hugging Face checkpoint directory."""
    from safetensors.numpy import load_file

    config_path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.exists(config_path):
        raise ConfigError(f"{config_path} does not exist. Fix: point --hf_dir at a directory written by "
                          "transformers' save_pretrained (config.json + model.safetensors).")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    hf.architecture_of(hf_config)  # an unsupported model fails before its weights are read
    if os.path.exists(os.path.join(hf_dir, HF_INDEX)):
        with open(os.path.join(hf_dir, HF_INDEX), encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, HF_WEIGHTS)):
        files = [HF_WEIGHTS]
    else:
        raise ConfigError(f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX}. Fix: save the model with "
                          "safe_serialization (the default); PyTorch .bin files are not read.")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(os.path.join(hf_dir, name)))
    return hf_config, tensors


def hf_tokenizer(hf_dir: str, hf_config: dict, tokenizer_path: str | None) -> tokenizers.HuggingFaceTokenizer:
    path = tokenizer_path or os.path.join(hf_dir, HF_TOKENIZER)
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; lm needs the checkpoint's tokenizer to encode text. Fix: "
                          "save it beside the weights (tokenizer.save_pretrained(DIR)) or pass --tokenizer.")
    with open(path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    return tokenizers.HuggingFaceTokenizer(tokenizer_json, _first(hf_config.get("eos_token_id"), 0),
                                           _first(hf_config.get("pad_token_id"), None))


def _first(ids: Any, default: int | None) -> int | None:
    if isinstance(ids, list):
        return ids[0] if ids else default
    return default if ids is None else int(ids)


def lm_config(hf_config: dict) -> ml_collections.ConfigDict:
    """The `lm` config of a Hugging Face model: base defaults, the model's fields, its context."""
    arch = hf.architecture_of(hf_config)
    config = base.get_config()
    config.model.update(arch.model_fields(hf_config))
    config.model.vocab_size = hf_config["vocab_size"]
    config.model.dropout = 0.0
    config.data.seq_len = arch.max_len(hf_config)
    return config


def import_hf(hf_dir: str, output: str, dtype: str = "float32", tokenizer_path: str | None = None) -> dict:
    """Writes the Hugging Face checkpoint in `hf_dir` as an `lm` export in `output`."""
    if dtype not in runs.EXPORT_DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not supported. Fix: use one of {runs.EXPORT_DTYPES}.")
    runs.check_new_directory(output)
    hf_config, tensors = read_hf_checkpoint(hf_dir)
    config = lm_config(hf_config)
    tokenizer = hf_tokenizer(hf_dir, hf_config, tokenizer_path)
    model_cfg = ModelConfig.from_config(config.model, config.model.vocab_size, config.data.seq_len)
    expected = nn.meta.unbox(abstract_params(build(model_cfg), config.data.seq_len))
    arch = hf.architecture_of(hf_config)
    params = hf.to_lm_params(arch.rules(config.model, model_cfg.vocab_size), tensors, expected)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32).astype(dtype), params)
    info = {"step": 0, "dtype": dtype, "parameters": param_counts(params)["total"],
            "source": os.path.abspath(hf_dir), "imported_from": {"model_type": hf_config["model_type"],
                                                                 "architectures": hf_config.get("architectures")},
            "exported_by": version.code_version()}
    runs.write_export(output, params, config, tokenizer, info)
    return info


def export_hf(path: str, output: str, step: int | None = None) -> dict:
    """Writes a run's or export's decoder as a Hugging Face directory in `output`:
    config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    from safetensors.numpy import save_file

    runs.check_new_directory(output)
    loaded = runs.load(path, step)
    model = ml_collections.ConfigDict(dataclasses.asdict(loaded.model_cfg))
    arch = hf.exportable_architecture(model)
    params = jax.tree.map(np.asarray, unstack_layers(loaded.params, model.num_layers))
    tensors = hf.to_hf_tensors(arch.rules(model, model.vocab_size), params)
    hf_config = arch.hf_config(model, model.vocab_size, model.max_len)
    dtype = str(next(iter(tensors.values())).dtype)
    # A document starts after <eos> in lm (an empty prompt is [eos]), so eos is also the bos.
    eos = loaded.tokenizer.eos_id
    hf_config.update(dtype=dtype, torch_dtype=dtype, eos_token_id=eos, bos_token_id=eos,
                     pad_token_id=loaded.tokenizer.pad_id)
    tokenizer_text = tokenizer_json.to_json(loaded.tokenizer)
    tokenizer_config = tokenizer_json.tokenizer_config(loaded.tokenizer, model.max_len)

    def fill(staging: str) -> None:
        save_file(tensors, os.path.join(staging, HF_WEIGHTS), metadata={"format": "pt"})
        for name, content in ((HF_CONFIG, hf_config), (HF_TOKENIZER_CONFIG, tokenizer_config)):
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        with open(os.path.join(staging, HF_TOKENIZER), "w", encoding="utf-8") as f:
            f.write(tokenizer_text)

    runs.publish_directory(output, fill)
    return {"architecture": arch.name, "tensors": len(tensors), "step": loaded.step,
            "tokenizer": loaded.tokenizer.kind}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """A scanned model's stacked `layers` as `layer_0`, `layer_1`, ... (an unrolled model as is)."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: a local Hugging Face checkpoint directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "export: an lm run's workdir or an lm export.")
_OUTPUT = flags.DEFINE_string("output", None, "The new directory to write; must not exist or be empty.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(runs.EXPORT_DTYPES), "import: the parameters' dtype.")
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint of a workdir; default the latest.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "import: a tokenizer.json; default the one in --hf_dir.")


def main(argv: list[str]) -> None:
    quiet_logging()
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        exit_with_error("usage: python -m lm.convert import --hf_dir=DIR --output=DIR, or "
                        "python -m lm.convert export --workdir=DIR --output=DIR")
    if not _OUTPUT.value:
        exit_with_error("--output is required: the new directory to write.")
    runtime.enable_compilation_cache()
    try:
        if argv[1] == "import":
            if not _HF_DIR.value:
                exit_with_error("import needs --hf_dir, a local Hugging Face checkpoint directory.")
            info = import_hf(os.path.expanduser(_HF_DIR.value), _OUTPUT.value, _DTYPE.value, _TOKENIZER.value)
            print(f"imported {info['imported_from']['model_type']}: {info['parameters']:,} parameters in "
                  f"{info['dtype']} to {_OUTPUT.value}", flush=True)
        else:
            if not _WORKDIR.value:
                exit_with_error("export needs --workdir, an lm run's workdir or an lm export.")
            info = export_hf(_WORKDIR.value, _OUTPUT.value, _STEP.value)
            print(f"exported {info['architecture']} ({info['tensors']} tensors, step {info['step']}) and its "
                  f"{info['tokenizer']} tokenizer as tokenizer.json to {_OUTPUT.value}", flush=True)
    except ConfigError as e:
        exit_with_error(str(e))


if __name__ == "__main__":
    app.run(main)
