"""Validation of a fine-tuning config (configs/finetune/base.py lists its fields).

`validate_finetune(config)` checks every value that needs nothing but the config, before
the pretrained model is loaded, and raises `ConfigError` naming the field, its value and
the fix. What needs the pretrained model (whether a regex matches a parameter, whether
`task.seq_len` fits its context) is checked by `lm.finetuning.loop.setup`.
"""

from __future__ import annotations

import re

import ml_collections

from lm.config import choices
from lm.config.validation import ConfigError, fail, require_choice, require_finite, require_positive

# Fields that must be > 0, and those that may also be 0 (what 0 means is in the schema; a
# learning rate of 0 keeps the weights, which tests of the loop's mechanics use).
_POSITIVE = ("finetune.steps", "finetune.batch_size", "finetune.eval_every", "finetune.lora.rank")
_NON_NEGATIVE = ("task.seq_len", "task.max_examples", "finetune.learning_rate", "finetune.frozen_learning_rate",
                 "finetune.lora.learning_rate", "finetune.lora.alpha", "finetune.layer_decay",
                 "finetune.warmup_steps", "finetune.weight_decay", "finetune.grad_clip", "finetune.patience",
                 "finetune.unfreeze_every")
# Regexes searched in parameter paths such as "backbone/layer_0/attn/qkv/kernel".
_REGEXES = ("finetune.freeze", "finetune.lora.targets")


def validate_finetune(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first value of a fine-tuning config that cannot run."""
    if not config.init_from:
        raise ConfigError("config.init_from is empty. Fix: set it to a pretrained run's workdir or an export, "
                          "e.g. --config.init_from=runs/shakespeare_char.")
    require_finite(config)
    _validate_methods(config)
    require_choice(config, "task.kind", choices.TASK_KINDS)
    require_choice(config, "task.pooling", choices.POOLINGS)
    if config.task.builder:
        require_choice(config, "task.builder", choices.TASK_BUILDERS)
    for field in _POSITIVE:
        require_positive(config, field)
    for field in _NON_NEGATIVE:
        require_positive(config, field, allow_zero=True)
    if not 0.0 <= config.finetune.dropout < 1.0:
        fail("finetune.dropout", config.finetune.dropout, "must lie in [0, 1)", "use e.g. 0.0 or 0.1")
    for field in _REGEXES:
        _require_regex(config, field)


def _validate_methods(config: ml_collections.ConfigDict) -> None:
    require_choice(config, "finetune.method", choices.FINETUNE_METHODS)
    compare = config.compare
    if isinstance(compare, str) or not isinstance(compare, (tuple, list)):
        fail("compare", compare, "is not a tuple of methods", "write e.g. --config.compare='(\"full\", \"lora\")', "
             "or () to run finetune.method alone")
    for method in compare:
        if method not in choices.FINETUNE_METHODS:
            fail("compare", tuple(compare), f"has {method!r}, not a method",
                 f"use methods of {', '.join(map(repr, choices.FINETUNE_METHODS))}")
    if len(set(compare)) != len(compare):
        fail("compare", tuple(compare), "repeats a method", "list each method once (each runs in workdir/<method>)")


def _require_regex(config: ml_collections.ConfigDict, field: str) -> None:
    pattern = config
    for part in field.split("."):
        pattern = pattern[part]
    if not isinstance(pattern, str):
        fail(field, pattern, "is not a regular expression", "give a string, e.g. 'layer_[01]/'")
    try:
        re.compile(pattern)
    except re.error as e:
        fail(field, pattern, f"is not a valid regular expression ({e})",
             "fix the pattern (Python's re syntax; escape [ ( . with a backslash to match them literally)")
