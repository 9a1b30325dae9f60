"""Convert between Hugging Face checkpoints (GPT-2, LLaMA family) and `lm` exports.

    python -m lm.convert import --hf_dir=~/models/gpt2 --output=/tmp/gpt2_lm
    python -m lm.convert export --workdir=/tmp/gpt2_lm --output=/tmp/gpt2_hf

`import` reads a local Hugging Face directory (config.json, model.safetensors or its
shards, tokenizer.json) and writes an `lm` export, which `lm.sample`, `lm.evaluate`,
`lm.finetune` and `lm.runs.artifacts.load` read. `export` writes a run or export back as a
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

from lm.config import parse_flags, schema
from lm.data import tokenizers
from lm.errors import UsageError, exit_with_error, quiet_logging
from lm.files.paths import read_json
from lm.interop import huggingface as hf
from lm.interop import tokenizer_json
from lm.model import ModelConfig, build
from lm.model.counting import abstract_params, param_counts
from lm.parallel import runtime
from lm.runs import artifacts, version
from lm.training import optim

HF_CONFIG, HF_WEIGHTS, HF_INDEX, HF_TOKENIZER = ("config.json", "model.safetensors", "model.safetensors.index.json",
                                                 "tokenizer.json")
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


_RESAVE = "save the model again with transformers' save_pretrained, or download it again."


def read_hf_checkpoint(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, {name: tensor}) of a local Hugging Face checkpoint directory.

    Raises UsageError naming the file if config.json or the weights are missing, are not
    JSON, or are damaged safetensors."""
    config_path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.exists(config_path):
        raise UsageError(f"{config_path} does not exist. Fix: point --hf_dir at a directory written by "
                          "transformers' save_pretrained (config.json + model.safetensors).")
    hf_config = read_json(config_path, fix=_RESAVE, kind=dict)
    hf.architecture_of(hf_config)  # an unsupported model fails before its weights are read
    index_path = os.path.join(hf_dir, HF_INDEX)
    if os.path.exists(index_path):
        weight_map = read_json(index_path, fix=_RESAVE, kind=dict).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UsageError(f"{index_path} has no weight_map of tensor names to files. Fix: {_RESAVE}")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(hf_dir, HF_WEIGHTS)):
        files = [HF_WEIGHTS]
    else:
        raise UsageError(f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX}. Fix: save the model with "
                          "safe_serialization (the default); PyTorch .bin files are not read.")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(_read_safetensors(os.path.join(hf_dir, name)))
    return hf_config, tensors


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # SafetensorError (truncated, not safetensors) or OSError (missing, unreadable)
        raise UsageError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}). Fix: {_RESAVE}") from None


HF_GENERATION_CONFIG = "generation_config.json"
# Spellings of the end-of-text and padding special tokens of common checkpoints, for a
# checkpoint that names neither id in its config files (GPT-2's config.json may lack them).
EOS_SPELLINGS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
PAD_SPELLINGS = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")


def hf_tokenizer(hf_dir: str, hf_config: dict, tokenizer_path: str | None) -> tokenizers.HuggingFaceTokenizer:
    """The checkpoint's tokenizer.json with its end-of-text and padding ids (`special_ids`).

    Raises UsageError if tokenizer.json is missing or the ids cannot be found or are not
    special tokens of it."""
    path = tokenizer_path or os.path.join(hf_dir, HF_TOKENIZER)
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist; lm needs the checkpoint's tokenizer to encode text. Fix: "
                          "save it beside the weights (tokenizer.save_pretrained(DIR)) or pass --tokenizer.")
    fix = "pass a Hugging Face tokenizer.json file (tokenizer.save_pretrained(DIR) writes DIR/tokenizer.json)."
    spec = read_json(path, fix=fix, kind=dict)
    with open(path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    sources = [(HF_CONFIG, hf_config), *((name, _read_json(os.path.join(hf_dir, name)))
                                         for name in (HF_GENERATION_CONFIG, HF_TOKENIZER_CONFIG))]
    try:
        eos, pad = special_ids(sources, spec)
        return tokenizers.HuggingFaceTokenizer(tokenizer_json, eos, pad)
    except UsageError:
        raise
    except Exception as e:  # the tokenizers library's own error for a file it cannot build
        raise UsageError(f"{path} is not a tokenizer the tokenizers library can build ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}). Fix: {fix}") from None


def _read_json(path: str) -> dict:
    return read_json(path, fix=_RESAVE, kind=dict) if os.path.exists(path) else {}


def special_ids(sources: list[tuple[str, dict]], tokenizer_json: dict) -> tuple[int, int]:
    """(eos id, pad id) of a Hugging Face checkpoint, each a special token of its tokenizer.

    `sources` are (file name, contents) of config.json, generation_config.json and
    tokenizer_config.json, read in that order: the first `eos_token_id` (a list gives its
    first id) or `eos_token` (a token's text, or {"content": text}) found names the eos,
    and likewise `pad_token_id`/`pad_token` the pad. Failing those, the tokenizer's one
    special added token spelled like an end of text (EOS_SPELLINGS, e.g. GPT-2's
    "<|endoftext|>") or padding (PAD_SPELLINGS) is taken; a checkpoint without padding
    pads with its eos, as GPT-2 does. Padding and the end of text must be special tokens:
    lm never encodes text to them, so an id of an ordinary token ("!", id 0 of GPT-2's
    vocabulary) would make that text impossible to encode.

    Raises UsageError naming the field to set when no eos is found, when a name matches
    no token, or when an id is not a special token of the tokenizer.
    """
    added = {t["id"]: t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    by_text = {content: i for i, content in added.items()}
    eos = _declared_id("eos", sources, by_text) or _by_spelling("eos", EOS_SPELLINGS, by_text)
    if eos is None:
        raise UsageError("this checkpoint names no end-of-text token: no eos_token_id in config.json or "
                          "generation_config.json, no eos_token in tokenizer_config.json, and no special token "
                          f"spelled {' or '.join(EOS_SPELLINGS)} (special tokens: {_listing(added)}). Fix: set "
                          "eos_token_id in config.json to the id of its end-of-text special token.")
    pad = _declared_id("pad", sources, by_text) or _by_spelling("pad", PAD_SPELLINGS, by_text) or eos
    for (name, (source, token_id)) in (("eos", eos), ("pad", pad)):
        if token_id not in added:
            raise UsageError(f"{source} gives {name} id {token_id}, which is not a special token of "
                              f"tokenizer.json, so lm would refuse the text it stands for (special tokens: "
                              f"{_listing(added)}). Fix: set {name}_token_id in config.json to one of them "
                              f"(or mark that token special in tokenizer.json's added_tokens).")
    return eos[1], pad[1]


def _declared_id(name: str, sources: list[tuple[str, dict]], by_text: dict[str, int]) -> tuple[str, int] | None:
    """(where, id) of the first `{name}_token_id` or `{name}_token` in the sources."""
    for source, fields in sources:
        token_id = _first(fields.get(f"{name}_token_id"))
        if token_id is not None:
            return f"{source}'s {name}_token_id", token_id
        text = fields.get(f"{name}_token")
        text = text.get("content") if isinstance(text, dict) else text
        if text is not None:
            if text not in by_text:
                raise UsageError(f"{source}'s {name}_token {text!r} is not a special token of tokenizer.json "
                                  f"(special tokens: {_listing({i: t for t, i in by_text.items()})}). Fix: set "
                                  f"{name}_token to one of them, or {name}_token_id in config.json.")
            return f"{source}'s {name}_token {text!r}", by_text[text]
    return None


def _by_spelling(name: str, spellings: tuple[str, ...], by_text: dict[str, int]) -> tuple[str, int] | None:
    found = [text for text in spellings if text in by_text]
    if len(found) > 1:
        raise UsageError(f"tokenizer.json has several special tokens that may end a text or pad ({found}) and "
                          f"the config files name none. Fix: set {name}_token_id in config.json.")
    return (f"the special token {found[0]!r}", by_text[found[0]]) if found else None


def _listing(tokens: dict[int, str]) -> str:
    return ", ".join(f"{i} {text!r}" for i, text in sorted(tokens.items())) or "none"


def _first(ids: Any) -> int | None:
    if isinstance(ids, list):
        return int(ids[0]) if ids else None
    return None if ids is None else int(ids)


def lm_config(hf_config: dict) -> ml_collections.ConfigDict:
    """The `lm` config of a Hugging Face model: base defaults, the model's fields, its context."""
    arch = hf.architecture_of(hf_config)
    config = schema.get_config()
    config.model.update(arch.model_fields(hf_config))
    config.model.vocab_size = hf_config["vocab_size"]
    config.model.dropout = 0.0
    config.data.seq_len = arch.max_len(hf_config)
    return config


def import_hf(hf_dir: str, output: str, dtype: str = "float32", tokenizer_path: str | None = None) -> dict:
    """Writes the Hugging Face checkpoint in `hf_dir` as an `lm` export in `output`."""
    if dtype not in artifacts.EXPORT_DTYPES:
        raise UsageError(f"--dtype={dtype!r} is not supported. Fix: use one of {artifacts.EXPORT_DTYPES}.")
    artifacts.check_new_directory(output)
    hf_config, tensors = read_hf_checkpoint(hf_dir)
    try:
        config = lm_config(hf_config)
    except KeyError as e:
        raise UsageError(f"{os.path.join(hf_dir, HF_CONFIG)} lacks {e.args[0]!r}, which a "
                         f"{hf_config.get('model_type')} config needs. Fix: {_RESAVE}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{os.path.join(hf_dir, HF_CONFIG)} has a field of the wrong type ({e}). "
                         f"Fix: {_RESAVE}") from None
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
    artifacts.write_export(output, params, config, tokenizer, info)
    return info


def export_hf(path: str, output: str, step: int | None = None) -> dict:
    """Writes a run's or export's decoder as a Hugging Face directory in `output`:
    config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    from safetensors.numpy import save_file

    artifacts.check_new_directory(output)
    loaded = artifacts.load(path, step, eval_params=optim.eval_params_reader)
    model = ml_collections.ConfigDict(dataclasses.asdict(loaded.model_cfg))
    arch = hf.exportable_architecture(model)
    params = jax.tree.map(np.asarray, unstack_layers(loaded.params, model.num_layers))
    params = hf.fold_mup(params, model)  # µP's attention and logit multipliers, into the weights
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
        # safetensors writes through a private (0600) temporary file; the weights are as
        # readable as the export's other files (the umask's default for a new file).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(staging, HF_WEIGHTS), 0o666 & ~umask)
        for name, content in ((HF_CONFIG, hf_config), (HF_TOKENIZER_CONFIG, tokenizer_config)):
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        with open(os.path.join(staging, HF_TOKENIZER), "w", encoding="utf-8") as f:
            f.write(tokenizer_text)

    artifacts.publish_directory(output, fill)
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
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(artifacts.EXPORT_DTYPES), "import: the parameters' dtype.")
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
    except UsageError as e:
        exit_with_error(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
