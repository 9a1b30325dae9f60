"""Resuming: which config fields a rerun on a workdir with checkpoints may change.

`RESUME` classifies every field of the schema (`lm.config.schema`); `resume_conflicts`
compares a checkpoint's saved config with a new one and lists the refused changes, each
with its reason. `lm.training.loop` refuses the rerun with them before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections

from lm.config import schema
from lm.config.choices import (
    MUP_RATE_EXPONENTS,
    PARAM_GROUPS,
    SAME_AS_OPTIM,
    d_ff,
    groups_share_one_optimizer,
    head_dim,
    num_kv_heads,
)


@dataclasses.dataclass(frozen=True)
class OnResume:
    """What a rerun on a workdir with checkpoints may do with one config field.

    `may_change`: False refuses a new value, since the checkpoint's train state or the
    data position it holds would no longer mean what the config says. `key` maps a value
    to what must stay equal (e.g. `bool` for "on or off"); `reason` is said in the error.
    """

    may_change: bool
    reason: str
    key: Callable[[Any], Any] = lambda value: value


_STATE = "the train state's shapes or what its parameters compute"
_OBJECTIVE = "the objective (the loss the train state was optimised for)"
_DATA = "the training data: documents, rows and their order, which the checkpoint's data position indexes"
_TOKENIZER = "the tokenizer: the workdir's tokenizer.json is reused, so a new value would be silently ignored"
_RUNTIME = "how the same computation runs, not what it computes"
_CADENCE = "evaluation, logging or checkpoint cadence, which the train state does not depend on"
_SCHEDULE = ("a hyperparameter of the same optimizer state (moments and step count keep their meaning); lowering "
             "the learning rate or tightening the clip and resuming is the usual cure for a loss spike")

# Every leaf of the schema, lm.config.schema (a dict-valued entry is one field: its keys are
# user data), classified; tests/test_resume_config.py fails on an unclassified one.
RESUME: dict[str, OnResume] = {
    "seed": OnResume(False, "initialisation, data order and dropout noise all derive from it"),
    "data.name": OnResume(True, "a label of the built dataset; the corpus itself is compared by content"),
    "data.files": OnResume(False, _DATA),
    "data.sources": OnResume(False, _DATA),
    **{f"data.{f}": OnResume(False, _DATA) for f in ("text_column", "where", "unit", "normalize", "split",
                                                      "validation_fraction", "packing", "seq_len")},
    "data.build": OnResume(False, "near-duplicate removal keeps slightly different documents in each build"),
    **{f"data.filters.{f}": OnResume(False, _DATA) for f in (
        "min_chars", "max_chars", "min_words", "max_words", "max_non_alpha_fraction", "max_duplicate_line_fraction",
        "max_top_bigram_fraction", "max_duplicate_ngram_fraction", "duplicate_ngram_size")},
    **{f"data.dedup.{f}": OnResume(False, _DATA) for f in ("exact", "near_threshold", "num_perm", "shingle_words")},
    "data.tokenizer": OnResume(False, _TOKENIZER),
    **{f"data.sentencepiece.{f}": OnResume(False, _TOKENIZER) for f in (
        "model", "model_type", "vocab_size", "byte_fallback", "user_defined_symbols", "max_sentences")},
    "data.data_dir": OnResume(True, "a cache location; the same corpus builds the same tokens anywhere"),
    "data.num_threads": OnResume(True, _RUNTIME),
    "data.prefetch": OnResume(True, _RUNTIME),
    **{f"model.{f}": OnResume(False, _STATE) for f in (
        "family", "num_decoder_layers", "num_layers", "num_heads", "d_model", "head_dim", "d_ff", "vocab_size",
        "positions", "rope_theta", "norm", "norm_eps", "activation", "use_bias", "tie_embeddings", "dropout",
        "init_std", "num_kv_heads", "scan_layers", "parametrization", "mup_base_width")},
    "model.dtype": OnResume(True, "the compute dtype of the same float32 parameters (what the hardware suits)"),
    "model.remat": OnResume(True, "recomputation trades memory for time and gives the same gradients"),
    "model.attention": OnResume(True, "each kernel computes the same attention of the same parameters"),
    **{f"objective.{f}": OnResume(False, _OBJECTIVE) for f in (
        "name", "z_loss", "prefix_lm.prefix_fraction", "masked_lm.rate", "masked_lm.mask_prob",
        "masked_lm.random_prob", "span_corruption.noise_density", "span_corruption.mean_span_length",
        "mixture.preset", "mixture.denoisers")},
    "objective.extra_ids": OnResume(False, _STATE + " (the vocabulary)"),
    **{f"optim.{f}": OnResume(True, _SCHEDULE) for f in (
        "lr", "schedule", "warmup_steps", "decay_steps", "final_lr", "b1", "b2", "eps", "weight_decay",
        "cooldown_fraction", "cooldown_shape", "step_boundaries", "step_gamma", "cycle_mode", "cycle_steps",
        "restart_steps", "restart_mult")},
    "optim.name": OnResume(False, "another optimizer has another state (moments, averages) to resume"),
    **{f"optim.{f}": OnResume(True, _SCHEDULE) for f in ("sgd.nesterov", "muon.momentum", "muon.ns_steps",
                                                          "muon.nesterov")},
    "optim.sgd.momentum": OnResume(False, "momentum on or off changes SGD's state tree", key=bool),
    # Each may change, but not so as to split or merge the groups' optimizers (`_one_optimizer`).
    **{f"optim.groups.{g}.{f}": OnResume(True, _SCHEDULE) for g in PARAM_GROUPS for f in ("lr_scale", "weight_decay")},
    "optim.grad_clip": OnResume(False, "clipping on or off changes the optimizer's state tree; its threshold "
                                       "may change", key=bool),
    "train.steps": OnResume(True, "a longer run extends the same one"),
    "train.batch_size": OnResume(False, "the checkpoint's data position counts batches of the old size: a new "
                                        "size would skip or repeat rows, and a step would mean other tokens"),
    "train.microbatches": OnResume(True, "gradient accumulation (or a pipeline's microbatches) gives the full "
                                         "batch's update"),
    "train.peak_flops_per_device": OnResume(True, "only the logged MFU"),
    **{f"train.{f}": OnResume(True, _CADENCE) for f in (
        "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "permanent_checkpoint_every",
        "keep_steps")},
    **{f"train.{f}": OnResume(True, "where a branch started; once it has checkpoints of its own it resumes "
                                    "from them") for f in ("branch_from", "branch_step")},
    "train.max_nonfinite_steps": OnResume(True, "a stopping rule: allowing more skipped steps and resuming is a "
                                                "documented cure for a divergence"),
    "eval.batch_size": OnResume(True, _CADENCE),
    "eval.num_batches": OnResume(True, _CADENCE),
    **{f"distill.{f}": OnResume(False, _OBJECTIVE) for f in ("teacher", "temperature", "alpha")},
    **{f"sample.{f}": OnResume(True, "only the sample printed at the end") for f in (
        "prompt", "max_new_tokens", "temperature", "top_k")},
    "sweep.budget": OnResume(True, "sweep bookkeeping, no effect on training"),
    "sweep.target_parameters": OnResume(True, "sweep bookkeeping, no effect on training"),
    "mesh.shape": OnResume(True, "checkpoints restore onto any mesh"),
    "mesh.dcn_shape": OnResume(True, "checkpoints restore onto any mesh"),
    "mesh.cpu_devices": OnResume(True, "checkpoints restore onto any mesh"),
    "mesh.pipeline_repeats": OnResume(True, "parameters keep their layer order whatever the pipeline"),
    "sharding.rules": OnResume(True, "a layout: restoring reshards the state"),
}

_UNCLASSIFIED = OnResume(False, "not classified in lm.config.RESUME, so refused to be safe")

# Fields whose 0 stands for a value derived from the other model fields (lm.config.choices),
# and the µP base width, which means nothing under the standard parametrization.
_RESOLVED = ("model.head_dim", "model.d_ff", "model.num_kv_heads", "model.mup_base_width")


def _resolved_model(fields: dict[str, Any]) -> dict[str, Any]:
    """The values of `_RESOLVED` that `fields` (config_fields) stand for: 0 means a value
    derived from the other model fields; a base width without µP stands for none (0)."""
    model = ml_collections.ConfigDict({k[len("model."):]: v for k, v in fields.items() if k.startswith("model.")})
    base_width = model.mup_base_width if model.parametrization == "mup" else 0
    return dict(zip(_RESOLVED, (head_dim(model), d_ff(model), num_kv_heads(model), base_width)))


def _one_optimizer(fields: dict[str, Any]) -> bool:
    """Whether the parameter groups share one optimizer (`groups_share_one_optimizer`),
    from config fields: their rate multipliers (µP's, `MUP_RATE_EXPONENTS`, included) and
    decays. Muon's matrices have Muon to themselves, so only its AdamW side's groups count."""
    groups = [g for g in PARAM_GROUPS if not (fields["optim.name"] == "muon" and g == "matrix")]
    mup = fields["model.parametrization"] == "mup" and fields["model.mup_base_width"] > 0
    m = fields["model.d_model"] / fields["model.mup_base_width"] if mup else 1.0
    exponents = MUP_RATE_EXPONENTS.get(fields["optim.name"], {})
    scales = [fields[f"optim.groups.{g}.lr_scale"] * m ** exponents.get(g, 0.0) for g in groups]
    decays = [fields["optim.weight_decay"] if fields[f"optim.groups.{g}.weight_decay"] == SAME_AS_OPTIM
              else fields[f"optim.groups.{g}.weight_decay"] for g in groups]
    return groups_share_one_optimizer(scales, decays)


def config_fields(config_json: dict, prefix: str = "") -> dict[str, Any]:
    """A config as JSON (`ConfigDict.to_json_best_effort`), flattened to `RESUME`'s dotted
    names: a nested dict is a section unless `RESUME` names it as one field."""
    fields = {}
    for name, value in config_json.items():
        path = prefix + name
        if isinstance(value, dict) and path not in RESUME:
            fields.update(config_fields(value, path + "."))
        else:
            fields[path] = value
    return fields


def stored_fields(saved: dict) -> dict[str, Any]:
    """`config_fields` of a stored config JSON (a checkpoint's, a workdir's config.json), a
    field it lacks (added to lm after it was written) counted as its schema default."""
    defaults = config_fields(json.loads(schema.get_config().to_json_best_effort()))
    return {**defaults, **config_fields(saved)}


def resume_conflicts(saved: dict, new: dict, ignore: Iterable[str] = ()) -> list[str]:
    """The fields (besides `ignore`) whose value in config JSON `new` may not replace the
    checkpoint's `saved` one, each as "config.F was OLD, now NEW (REASON)".

    A field that `saved` lacks (added to lm after the checkpoint) counts as its default
    from the schema (`lm.config.schema`).
    """
    old, new = stored_fields(saved), config_fields(new)
    # A zero default spelled out (head_dim=16 where 0 meant 16), or a base width without µP, is no change.
    resolved_old, resolved_new = _resolved_model(old), _resolved_model(new)
    conflicts = []
    for field in sorted(set(old) | set(new)):
        rule = RESUME.get(field, _UNCLASSIFIED)
        if field in ignore or rule.may_change:
            continue
        if field in _RESOLVED and resolved_old[field] == resolved_new[field]:
            continue
        before, after = old.get(field), new.get(field)
        if rule.key(before) != rule.key(after):
            conflicts.append(f"config.{field} was {before!r}, now {after!r} ({rule.reason})")
    # Only when what else shapes the groups is unchanged: a change there is refused above by name.
    causes = ("optim.name", "model.parametrization", "model.mup_base_width", "model.d_model")
    if all(old[f] == new[f] for f in causes) and _one_optimizer(old) != _one_optimizer(new):
        said = {True: "one rate multiplier and weight decay for every group", False: "groups of different rates "
                "or weight decays"}
        conflicts.append(f"config.optim.groups gave {said[_one_optimizer(old)]}, now {said[_one_optimizer(new)]} "
                         "(one optimizer for every group and one per group hold different optimizer states; "
                         "keep the groups' lr_scale and weight_decay as uniform or as varied as before)")
    return conflicts
