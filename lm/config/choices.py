"""The values a config field may take, and what its zero defaults resolve to.

Each tuple lists the allowed values of one choice field of the schema (`lm.config.schema`);
validation (`lm.config.validation`) checks against them and names them in its errors, and
the libraries that implement a choice import its tuple from here (e.g. `lm.data.documents`
reads the files `CORPUS_SUFFIXES` names).
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections

TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")  # the files lm.data.documents reads
# The files lm.data.sources reads (also `datasets` save_to_disk folders, found by their state.json).
CORPUS_SUFFIXES = TEXT_SUFFIXES + (".jsonl.zst", ".parquet")
UNITS = ("file", "paragraph", "line")  # what one document is in a .txt file
NORMAL_FORMS = ("none", "NFC", "NFKC")
TOKENIZERS = ("char", "byte", "sentencepiece")
SPLIT_MODES = ("tail", "hash")
BUILDS = ("memory", "datatrove")  # how a corpus is built (lm.data.text_files, lm.data.build)
PACKINGS = ("stream", "pack")
SP_MODEL_TYPES = ("bpe", "unigram")
FAMILIES = ("decoder", "encoder", "encoder_decoder")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "xla", "splash", "cudnn")  # lm.model.attention
PARAMETRIZATIONS = ("standard", "mup")  # lm.model.mup
# µP's rate rule of each optimizer (lm.model.mup gives each one's source): a group's rate is
# multiplied by m**e, m = d_model / mup_base_width, e its exponent here (groups not named: 1).
# An optimizer not here has no µP rule in lm (validation refuses the pair; lm.model.mup says why).
_ADAM_MUP_RULE = {"matrix": -1.0}
MUP_RATE_EXPONENTS = {
    "adamw": _ADAM_MUP_RULE, "adam": _ADAM_MUP_RULE, "lion": _ADAM_MUP_RULE, "schedule_free_adamw": _ADAM_MUP_RULE,
    "muon": {},
    "adafactor": {"matrix": -0.5},
}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "muon", "schedule_free_adamw")  # lm.training.optim
# Optimizers whose train-state parameters are not the ones to evaluate (lm.training.optim.eval_params).
AVERAGED_OPTIMIZERS = ("schedule_free_adamw",)
PARAM_GROUPS = ("matrix", "embedding", "head", "norm", "bias")  # lm.training.param_groups
SAME_AS_OPTIM = -1.0  # a group's weight_decay that means optim.weight_decay
# The learning-rate schedules (lm.training.schedules) and their choice fields.
SCHEDULES = ("cosine", "linear", "constant", "rsqrt", "wsd", "step", "cyclical", "cosine_restarts")
COOLDOWN_SHAPES = ("linear", "cosine", "1-sqrt")  # WSD's cooldown
CYCLE_MODES = ("triangular", "one_cycle")  # the "cyclical" schedule
MESH_AXES = ("stage", "data", "fsdp", "tensor")  # outermost first: stages cross the slowest links
OBJECTIVES = ("causal", "prefix_lm", "masked_lm", "span_corruption", "mixture")
# The model families each objective trains.
OBJECTIVE_FAMILIES = {"causal": ("decoder",), "prefix_lm": ("decoder",), "masked_lm": ("encoder",),
                      "span_corruption": ("encoder_decoder",), "mixture": ("encoder_decoder", "decoder")}

# Fine-tuning (configs/finetune/base.py): what trains, the task and how it is built.
FINETUNE_METHODS = ("full", "lora", "frozen")  # everything; adapters + head; the head alone
TASK_KINDS = ("classification", "token_classification", "sft")
TASK_BUILDERS = ("shakespeare_speakers", "shakespeare_word_order")  # lm.finetuning.datasets
POOLINGS = ("last", "mean")  # classification: the hidden state a head reads

# Spellings lm's SentencePiece models reserve: its control pieces, <unk>, the byte pieces
# of byte fallback, and "<eos>" (the end-of-document token's name in lm's other tokenizers).
SP_RESERVED = ("<pad>", "</s>", "<eos>", "<unk>")


def head_dim(model: ml_collections.ConfigDict) -> int:
    """The per-head width: `model.head_dim`, or 0 for d_model // num_heads."""
    return model.head_dim or model.d_model // model.num_heads


def d_ff(model: ml_collections.ConfigDict) -> int:
    """The MLP width: `model.d_ff`, or 0 for 4 x d_model (SwiGLU: 8/3 x d_model rounded up
    to a multiple of 64, which keeps its three matrices' parameters equal to a 4x GELU MLP)."""
    if model.d_ff:
        return model.d_ff
    return 4 * model.d_model if model.activation != "swiglu" else -(-(8 * model.d_model // 3) // 64) * 64


def num_kv_heads(model: ml_collections.ConfigDict) -> int:
    """The key/value heads: `model.num_kv_heads`, or 0 for num_heads (multi-head attention)."""
    return model.num_kv_heads or model.num_heads


def groups_share_one_optimizer(lr_scales: Iterable[float], weight_decays: Iterable[float]) -> bool:
    """Whether one optimizer with a decay mask serves parameter groups of these rate
    multipliers and decoupled weight decays: one multiplier and at most one nonzero decay.
    Else each group gets an optimizer of its own (lm.training.param_groups), and the
    optimizer state another tree."""
    return len(set(lr_scales)) == 1 and len(set(weight_decays) - {0.0}) <= 1
