"""What a run's config is and which values can run.

- `schema`: every field, its default and what it means (`schema.get_config()`; recipes
  reach it as configs/base.py).
- `choices`: the allowed values of the choice fields, and what the zero defaults
  (`head_dim`, `d_ff`, `num_kv_heads`) resolve to.
- `validation`: `validate(config)`, one pass before any work that raises `ConfigError`
  naming the field, its value and the fix; `validated_config` for commands.
- `finetune`: `validate_finetune(config)`, the same for a fine-tuning config
  (configs/finetune/base.py).
- `schedule_fields`: the learning-rate schedule's fields in steps (WSD's `cooldown_start`,
  SGDR's `restart_periods`) and their checks, which `validate` runs.
- `flags`: `parse_flags`, the command-line parser of every command taking `--config`.
- `resume`: which fields a rerun on a workdir with checkpoints may change (`RESUME`,
  `resume_conflicts`).

The names below are re-exported so callers write `from lm import config as config_lib;
config_lib.validate(...)` or `from lm.config import ConfigError, MESH_AXES`.
"""

from lm.config.choices import (
    ACTIVATIONS,
    ATTENTIONS,
    COOLDOWN_SHAPES,
    CORPUS_SUFFIXES,
    CYCLE_MODES,
    DTYPES,
    FAMILIES,
    FINETUNE_METHODS,
    MESH_AXES,
    NORMAL_FORMS,
    NORMS,
    OBJECTIVE_FAMILIES,
    OBJECTIVES,
    PACKINGS,
    POOLINGS,
    POSITIONS,
    REMAT_POLICIES,
    SCHEDULES,
    SP_MODEL_TYPES,
    SP_RESERVED,
    SPLIT_MODES,
    TASK_BUILDERS,
    TASK_KINDS,
    TEXT_SUFFIXES,
    TOKENIZERS,
    UNITS,
    d_ff,
    head_dim,
    num_kv_heads,
)
from lm.config.finetune import validate_finetune
from lm.config.flags import parse_flags
from lm.config.resume import RESUME, OnResume, config_fields, resume_conflicts, stored_fields
from lm.config.validation import (
    ConfigError,
    check_user_defined_symbols,
    fail,
    require_choice,
    require_finite,
    require_positive,
    resolve_files,
    validate,
    validated_config,
)

__all__ = [
    "ACTIVATIONS", "CORPUS_SUFFIXES", "DTYPES", "FAMILIES", "MESH_AXES", "NORMAL_FORMS", "NORMS",
    "ATTENTIONS", "OBJECTIVE_FAMILIES", "OBJECTIVES", "PACKINGS", "POSITIONS", "REMAT_POLICIES", "SCHEDULES",
    "COOLDOWN_SHAPES", "CYCLE_MODES",
    "SP_MODEL_TYPES", "SP_RESERVED", "SPLIT_MODES", "TEXT_SUFFIXES", "TOKENIZERS", "UNITS",
    "d_ff", "head_dim", "num_kv_heads",
    "FINETUNE_METHODS", "POOLINGS", "TASK_BUILDERS", "TASK_KINDS",
    "parse_flags", "RESUME", "OnResume", "config_fields", "resume_conflicts", "stored_fields",
    "ConfigError", "check_user_defined_symbols", "fail", "require_choice", "require_finite",
    "require_positive", "resolve_files",
    "validate", "validated_config", "validate_finetune",
]
