"""Config validation: one pass before any work, with errors that name the field and the fix
(the primitives: `lm.config.checks`).

`validate(config)` checks values that need nothing but the config and the filesystem, and
raises `ConfigError`. Checks that need the devices (mesh shape, batch divisibility) live
in `lm.parallel.sharding` and raise its `MeshError`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from typing import Any

import ml_collections

from lm.config import choices, inputs, schedule_fields
from lm.config.checks import (  # noqa: F401  (ConfigError and the checks: imported from here too)
    ConfigError,
    fail,
    field_value,
    require_choice,
    require_finite,
    require_positive,
)
from lm.errors import exit_with_error


def check_user_defined_symbols(symbols: Any) -> None:
    """Raises ConfigError unless `symbols` (data.sentencepiece.user_defined_symbols) is a
    tuple of distinct, non-empty strings that SentencePiece can keep whole as text: none
    may spell a piece lm reserves (choices.SP_RESERVED or a byte piece "<0x41>"), which
    SentencePiece would reject with an unrelated INTERNAL error or which would turn a
    control token into text, nor hold whitespace or "▁" (SentencePiece's space), which
    would split it or change its text."""
    field = "data.sentencepiece.user_defined_symbols"
    example = "--config.data.sentencepiece.user_defined_symbols='(\"<sep>\",)'"
    if isinstance(symbols, str) or not isinstance(symbols, (tuple, list)) \
            or not all(isinstance(s, str) for s in symbols):
        fail(field, symbols, "is not a tuple of strings", f"give a tuple, e.g. {example}")
    for symbol in symbols:
        if symbol in choices.SP_RESERVED or re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", symbol):
            fail(field, symbols, f"has {symbol!r}, a piece lm's SentencePiece models reserve (<pad>, </s> and "
                 "<eos> are control tokens only code inserts, <unk> and <0xNN> stand for unknown text)",
                 f"remove it, or use a name of your own such as '<sep>': {example}")
        if not symbol or any(c.isspace() or c == "\u2581" for c in symbol):
            fail(field, symbols, f"has {symbol!r}: a symbol is kept whole as text only if it is non-empty and "
                 "holds no whitespace (nor '▁', SentencePiece's space)", f"use e.g. {example}")
    if len(set(symbols)) != len(symbols):
        fail(field, symbols, "repeats a symbol", "list each symbol once")


def resolve_files(patterns: Iterable[str], field: str = "data.files") -> list[str]:
    """Expands `data.files` (paths, directories or globs, `~` allowed) to the corpus inputs
    (`lm.config.inputs.matches`): each pattern's matches sorted, in the patterns' order, an
    input named twice (or through a link) kept at its first place.

    Raises ConfigError naming the pattern that matched nothing, or a DatasetDict folder.
    """
    files: dict[str, str] = {}
    for pattern in patterns:
        try:
            found = inputs.matches(pattern)
        except ValueError as e:
            fail(field, pattern, "names no single dataset", str(e))
        except OSError as e:
            fail(field, pattern, f"names a directory that cannot be read ({e.filename}: {e.strerror})",
                 "check it exists and this user may list it (its permissions)")
        if not found:
            fail(field, pattern, f"matches no corpus file (looked for {os.path.abspath(os.path.expanduser(pattern))} "
                 f"ending in {', '.join(choices.CORPUS_SUFFIXES)}, or a datasets save_to_disk folder)",
                 f"point {field} at existing corpus files, e.g. --config.{field}='(\"/path/to/corpus.txt\",)'")
        inputs.unique(found, files)
    return list(files.values())


def check_where(field: str, text: Any) -> None:
    """Raises ConfigError unless `text` (data.where or a source's) is a filter
    `lm.config.inputs.parse_where` reads."""
    if not isinstance(text, str):
        fail(field, text, "is not a string", f"give a filter string, e.g. --config.{field}={inputs.WHERE_EXAMPLE}")
    try:
        inputs.parse_where(text)
    except ValueError as e:
        fail(field, text, str(e), f"write e.g. --config.{field}={inputs.WHERE_EXAMPLE}, or '' for every row")


def check_text_column(field: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        fail(field, name, "must name a column", f"give the column holding the text, e.g. --config.{field}=text")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first value that cannot run."""
    require_finite(config)
    _validate_data(config)
    _validate_model(config)
    _validate_objective(config)
    _validate_train(config)  # before the schedule, which is measured in train.steps
    _validate_optim(config)
    _validate_optimizer(config)
    _validate_distill(config)
    _validate_mesh_fields(config)


def _validate_data(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if isinstance(d.files, str) or not d.files:
        fail("data.files", d.files, "must be a non-empty tuple of paths or globs",
             "write it as a tuple, e.g. ('corpus.txt',)")
    resolve_files(d.files)
    check_text_column("data.text_column", d.text_column)
    check_where("data.where", d.where)
    for name, source in d.sources.items():
        if not {"files", "weight"} <= set(source.keys()) <= {"files", "weight", "text_column", "where"}:
            fail(f"data.sources.{name}", source.to_dict(), "must have the fields files and weight, and may have "
                 "text_column and where (else data's)", f"write data.sources.{name} = "
                 "ml_collections.ConfigDict(dict(files=('a.parquet',), weight=1.0, where='score >= 3'))")
        if isinstance(source.files, str) or not source.files:
            fail(f"data.sources.{name}.files", source.files, "must be a non-empty tuple of paths or globs",
                 "write it as a tuple, e.g. ('corpus.jsonl',)")
        resolve_files(source.files, f"data.sources.{name}.files")
        require_positive(config, f"data.sources.{name}.weight")
        if "text_column" in source:
            check_text_column(f"data.sources.{name}.text_column", source.text_column)
        if "where" in source:
            check_where(f"data.sources.{name}.where", source.where)
    if not 0.0 < d.validation_fraction < 1.0:
        fail("data.validation_fraction", d.validation_fraction, "must lie strictly between 0 and 1",
             "hold out a fraction such as 0.1")
    require_choice(config, "data.unit", choices.UNITS)
    require_choice(config, "data.normalize", choices.NORMAL_FORMS)
    require_choice(config, "data.split", choices.SPLIT_MODES)
    require_choice(config, "data.build", choices.BUILDS)
    if d.build == "datatrove" and d.split != "hash":
        fail("data.split", d.split, "cannot be built by data.build='datatrove' (the tail of each file needs "
             "the whole file's documents in memory)", "set --config.data.split=hash, or data.build='memory'")
    require_choice(config, "data.packing", choices.PACKINGS)
    for field, value in d.filters.items():
        require_positive(config, f"data.filters.{field}", allow_zero=True)
        if field.endswith("_fraction") and value > 1:
            fail(f"data.filters.{field}", value, "is a fraction above 1", "use a value in [0, 1]; 0 is off")
    if not 0.0 <= d.dedup.near_threshold <= 1.0:
        fail("data.dedup.near_threshold", d.dedup.near_threshold, "must lie in [0, 1]",
             "use e.g. 0.8, or 0 to turn near-duplicate removal off")
    require_positive(config, "data.dedup.num_perm")
    require_positive(config, "data.dedup.shingle_words")
    require_choice(config, "data.tokenizer", choices.TOKENIZERS)
    if d.tokenizer == "sentencepiece":
        require_choice(config, "data.sentencepiece.model_type", choices.SP_MODEL_TYPES)
        require_positive(config, "data.sentencepiece.vocab_size")
        require_positive(config, "data.sentencepiece.max_sentences")
        check_user_defined_symbols(d.sentencepiece.user_defined_symbols)
        if d.sentencepiece.model and not os.path.isfile(os.path.expanduser(d.sentencepiece.model)):
            fail("data.sentencepiece.model", d.sentencepiece.model, "is not a file",
                 "train one with `python -m lm.tokenizer train`, or set it to '' to train "
                 "one from the corpus automatically")
    require_positive(config, "data.seq_len")
    require_positive(config, "data.num_threads", allow_zero=True)
    if not d.name or not d.name.replace("_", "").isalnum():
        fail("data.name", d.name, "must be a non-empty name of letters, digits and _",
             "name the corpus e.g. 'my_corpus'")


def _validate_model(config: ml_collections.ConfigDict) -> None:
    m = config.model
    require_choice(config, "model.family", choices.FAMILIES)
    for field in ("num_layers", "num_heads", "d_model"):
        require_positive(config, f"model.{field}")
    for field in ("head_dim", "d_ff", "vocab_size"):
        require_positive(config, f"model.{field}", allow_zero=True)
    if not m.head_dim and m.d_model % m.num_heads:
        nearest = m.num_heads * max(1, round(m.d_model / m.num_heads))
        fail("model.d_model", m.d_model, f"is not divisible by config.model.num_heads={m.num_heads}",
             f"choose d_model a multiple of num_heads (e.g. {nearest}), or set model.head_dim explicitly")
    require_choice(config, "model.positions", choices.POSITIONS)
    if m.positions == "rope" and choices.head_dim(m) % 2:
        fail("model.head_dim", choices.head_dim(m), "must be even for rotary positions",
             "choose an even head_dim or use model.positions='learned'")
    require_positive(config, "model.num_kv_heads", allow_zero=True)
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        fail("model.num_kv_heads", m.num_kv_heads, f"does not divide config.model.num_heads={m.num_heads}",
             "choose a divisor of num_heads (e.g. 1 for multi-query attention), or 0 for num_heads")
    require_choice(config, "model.remat", choices.REMAT_POLICIES)
    require_choice(config, "model.attention", choices.ATTENTIONS)
    require_choice(config, "model.norm", choices.NORMS)
    require_choice(config, "model.activation", choices.ACTIVATIONS)
    require_choice(config, "model.dtype", choices.DTYPES)
    if not 0.0 <= m.dropout < 1.0:
        fail("model.dropout", m.dropout, "must lie in [0, 1)", "use e.g. 0.0 or 0.1")
    require_positive(config, "model.init_std")
    _validate_parametrization(config)


def _validate_parametrization(config: ml_collections.ConfigDict) -> None:
    m = config.model
    require_choice(config, "model.parametrization", choices.PARAMETRIZATIONS)
    if not isinstance(m.mup_base_width, int) or m.mup_base_width < 0:
        fail("model.mup_base_width", m.mup_base_width, "must be a whole width >= 0", "e.g. 128, or 0 when unset")
    if m.parametrization == "mup" and not m.mup_base_width:
        fail("model.mup_base_width", m.mup_base_width, "must be set when model.parametrization='mup' (µP scales "
             "by d_model / mup_base_width)", "set --config.model.mup_base_width to the d_model the "
             f"hyperparameters were tuned at (e.g. {m.d_model}, this model's, for the base model itself)")
    if m.parametrization == "mup" and config.optim.name not in choices.MUP_RATE_EXPONENTS:
        fail("optim.name", config.optim.name, "has no µP learning-rate rule in lm (lm.model.mup says why)",
             f"use one of {', '.join(map(repr, choices.MUP_RATE_EXPONENTS))}, or model.parametrization='standard'")


def _validate_mixture(config: ml_collections.ConfigDict) -> None:
    from lm.objectives import mixture  # late: lm.objectives imports jax

    mix = config.objective.mixture
    if not mix.denoisers:
        require_choice(config, "objective.mixture.preset", tuple(mixture.PRESETS))
        return
    fields = {f.name for f in dataclasses.fields(mixture.Denoiser)}
    for i, given in enumerate(mix.denoisers):
        field = f"objective.mixture.denoisers[{i}]"
        unknown = set(dict(given)) - fields
        if unknown or not {"kind", "task"} <= set(dict(given)):
            fail(field, given, f"has unknown keys {sorted(unknown)} or lacks 'kind'/'task'",
                 f"give a dict of lm.objectives.Denoiser's fields: {sorted(fields)}")
        d = mixture.Denoiser(**dict(given))
        if d.kind not in mixture.KINDS:
            fail(field, given, f"has kind {d.kind!r}", f"use one of {mixture.KINDS}")
        if not (d.weight > 0 and 0 < d.noise_density < 1 and d.mean_span_length >= 1
                and 0 <= d.target_fraction < 1):
            fail(field, given, "is out of range", "use weight > 0, 0 < noise_density < 1, "
                 "mean_span_length >= 1 and 0 <= target_fraction < 1")


def _validate_objective(config: ml_collections.ConfigDict) -> None:
    from lm.objectives import denoisers, extra_ids_needed, mixture  # late: lm.objectives imports jax

    ob = config.objective
    require_choice(config, "objective.name", choices.OBJECTIVES)
    fits = choices.OBJECTIVE_FAMILIES[ob.name]
    if config.model.family not in fits:
        fail("objective.name", ob.name, f"does not fit config.model.family={config.model.family!r}: it needs "
             f"{' or '.join(map(repr, fits))}",
             f"set config.model.family={fits[0]!r}, or pick an objective for {config.model.family!r} "
             f"({', '.join(o for o, f in choices.OBJECTIVE_FAMILIES.items() if config.model.family in f)})")
    require_positive(config, "objective.z_loss", allow_zero=True)
    require_positive(config, "objective.extra_ids", allow_zero=True)
    if not 0.0 <= ob.prefix_lm.prefix_fraction < 1.0:
        fail("objective.prefix_lm.prefix_fraction", ob.prefix_lm.prefix_fraction, "must lie in [0, 1)",
             "use 0 for a random split point per document, or e.g. 0.5")
    if ob.name == "mixture":
        _validate_mixture(config)
        for d in denoisers(ob):
            if not mixture.tokens_read(d, config.model.family, config.data.seq_len):
                fail("data.seq_len", config.data.seq_len, f"is too short for the denoiser {d}",
                     "raise data.seq_len or drop that denoiser")
    needed = extra_ids_needed(ob, config.data.seq_len, config.model.family)
    if ob.extra_ids < needed:
        what = {"masked_lm": "a [MASK] id", "span_corruption": f"{needed} sentinel ids (one per noise span)",
                "mixture": f"{needed} ids (task tokens, then one sentinel per noise span)"}[ob.name]
        fail("objective.extra_ids", ob.extra_ids, f"leaves no room in the vocabulary for {what} of "
             f"objective {ob.name!r}", f"set config.objective.extra_ids={needed} (or more); they are "
             "appended after the tokenizer's ids")
    if ob.name in ("span_corruption", "mixture") and config.data.packing != "stream":
        fail("data.packing", config.data.packing, f"is not supported by objective {ob.name!r} (rows are "
             "corrupted whole)", "use config.data.packing='stream'")


MAX_NS_STEPS = 20  # Muon's Newton-Schulz iterations: 5 in Jordan et al. 2024; 10 is already generous


def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
    o = config.optim
    require_choice(config, "optim.name", choices.OPTIMIZERS)
    if o.name == "schedule_free_adamw" and o.schedule != "constant":
        fail("optim.schedule", o.schedule, "does not suit optim.name='schedule_free_adamw', which averages the "
             "iterates instead of decaying the rate", "use --config.optim.schedule=constant (the warmup stays), or "
             "another optim.name")
    if o.name == "schedule_free_adamw" and o.b1 == 0.0:  # each fault on its own: the fix names only what is wrong
        fail("optim.b1", o.b1, "does not suit optim.name='schedule_free_adamw': its b1 weighs the averaged "
             "iterate in the point where gradients are taken, and its evaluation parameters divide by it "
             "(optax.contrib.schedule_free_eval_params), so it needs b1 > 0", "use optim.b1 in (0, 1), e.g. 0.9")
    for field in ("sgd.momentum", "muon.momentum"):
        if not 0.0 <= field_value(o, field) < 1.0:
            fail(f"optim.{field}", field_value(o, field), "must lie in [0, 1)", "use e.g. 0.9")
    require_positive(config, "optim.muon.ns_steps")
    if o.muon.ns_steps > MAX_NS_STEPS:
        fail("optim.muon.ns_steps", o.muon.ns_steps, f"is more Newton-Schulz iterations than any use needs (at most "
             f"{MAX_NS_STEPS}; each is unrolled into the step, so the compile grows with them)",
             "use 5, the Muon authors' choice")
    for name in choices.PARAM_GROUPS:
        require_positive(config, f"optim.groups.{name}.lr_scale", allow_zero=True)  # 0 freezes the group
        decay = o.groups[name].weight_decay
        if not isinstance(decay, int | float) or not (decay == -1 or decay >= 0):
            fail(f"optim.groups.{name}.weight_decay", decay, "must be >= 0, or -1, which means "
                 f"optim.weight_decay (here {o.weight_decay!r})",
                 f"set it >= 0 (0 for no decay of the {name} group), or -1")


def _validate_optim(config: ml_collections.ConfigDict) -> None:
    o = config.optim
    require_positive(config, "optim.lr")
    require_positive(config, "optim.final_lr", allow_zero=True)
    require_positive(config, "optim.warmup_steps", allow_zero=True)
    require_positive(config, "optim.decay_steps", allow_zero=True)
    require_positive(config, "optim.weight_decay", allow_zero=True)
    require_positive(config, "optim.grad_clip", allow_zero=True)
    for field in ("b1", "b2"):
        if not 0.0 <= o[field] < 1.0:
            fail(f"optim.{field}", o[field], "must lie in [0, 1)", "use e.g. 0.9")
    # Adam's, schedule-free AdamW's and Adafactor's denominator: at 0 a parameter that never
    # gets a gradient (an unused token's embedding row) divides 0 by 0; below 0 it ascends.
    require_positive(config, "optim.eps")
    found = schedule_fields.problem(o, config.train.steps)  # the schedule's own fields, and room for the warmup
    if found:
        fail(*found)


def _validate_distill(config: ml_collections.ConfigDict) -> None:
    d = config.distill
    if not d.teacher:
        return
    if config.model.family != "decoder" or config.objective.name != "causal":
        fail("distill.teacher", d.teacher, "distils next-token distributions, which needs model.family='decoder' "
             f"and objective.name='causal' (this run has {config.model.family!r} and {config.objective.name!r})",
             "distil a causal decoder, or set distill.teacher=''")
    require_positive(config, "distill.temperature")
    if not 0.0 <= d.alpha <= 1.0:
        fail("distill.alpha", d.alpha, "must lie in [0, 1]", "use e.g. 0.5 (half distillation, half cross-entropy)")
    if not os.path.exists(os.path.join(os.path.expanduser(d.teacher), "config.json")):
        fail("distill.teacher", d.teacher, "is neither a run's workdir nor an export (it has no config.json)",
             "point it at a directory written by lm.main or lm.export")


def _validate_train(config: ml_collections.ConfigDict) -> None:
    for field in ("train.steps", "train.batch_size", "train.log_every", "eval.batch_size",
                  "train.keep_checkpoints", "train.microbatches"):
        require_positive(config, field)
    for field in ("train.eval_every", "train.checkpoint_every", "train.permanent_checkpoint_every",
                  "eval.num_batches", "train.peak_flops_per_device",
                  "train.max_nonfinite_steps",
                  "sample.max_new_tokens", "sample.top_k", "sample.temperature"):
        require_positive(config, field, allow_zero=True)
    _validate_branch(config.train)


def _validate_branch(t: ml_collections.ConfigDict) -> None:
    if not all(isinstance(s, int) and 0 < s <= t.steps for s in t.keep_steps):
        fail("train.keep_steps", t.keep_steps, f"must hold steps from 1 to train.steps={t.steps}", "e.g. (400, 800)")
    if t.branch_from and not (isinstance(t.branch_step, int) and 0 < t.branch_step < t.steps):
        fail("train.branch_step", t.branch_step, f"must be a step from 1 to train.steps-1={t.steps - 1} when "
             f"train.branch_from is set ({t.branch_from!r})", "give the step of the checkpoint to branch from "
             "(one that run keeps), or unset train.branch_from")
    if not t.branch_from and t.branch_step != 0:
        fail("train.branch_step", t.branch_step, "is set but train.branch_from is not", "set train.branch_from to "
             "the workdir of the run to branch from, or leave train.branch_step at 0")


def _validate_mesh_fields(config: ml_collections.ConfigDict) -> None:
    shape = dict(config.mesh.shape)
    if not _names_mesh_axes(shape):
        fail("mesh.shape", shape, f"must name exactly the axes {choices.MESH_AXES} (stage may be left out: 1)",
             "give a size for each, e.g. dict(stage=1, data=-1, fsdp=1, tensor=1)")
    for axis, size in shape.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            fail(f"mesh.shape.{axis}", size, "must be a positive device count or -1",
                 "use -1 for 'the devices the other axes leave'")
    if list(shape.values()).count(-1) > 1:
        fail("mesh.shape", shape, "has more than one axis set to -1", "give explicit sizes to all but one")
    dcn = dict(config.mesh.dcn_shape)
    if not _names_mesh_axes(dcn) or not all(isinstance(v, int) and v >= 1 for v in dcn.values()):
        fail("mesh.dcn_shape", dcn, f"must give a positive slice count for each of {choices.MESH_AXES}",
             "e.g. dict(stage=1, data=2, fsdp=1, tensor=1) for two slices or nodes")
    require_positive(config, "mesh.cpu_devices", allow_zero=True)
    require_positive(config, "mesh.pipeline_repeats")
    for rule in config.sharding.rules:
        axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        unknown = [a for a in axes if a is not None and a not in choices.MESH_AXES]
        if unknown:
            fail("sharding.rules", rule, f"maps to unknown mesh axes {unknown}",
                 f"map logical axes to {choices.MESH_AXES} or None")


def _names_mesh_axes(sizes: dict) -> bool:
    """Whether a mesh shape names every mesh axis, but for `stage`, which configs written
    before pipeline parallelism leave out (it is then 1)."""
    return set(sizes) in (set(choices.MESH_AXES), set(choices.MESH_AXES) - {"stage"})


def validated_config(config: ml_collections.ConfigDict | None, example: str) -> ml_collections.ConfigDict:
    """A command's --config value, validated; exits with one message if missing or wrong.

    `example` completes "--config is required, e.g. --config=...".
    """
    if config is None:
        exit_with_error(f"--config is required, e.g. --config={example}")
    try:
        validate(config)
    except ConfigError as e:
        exit_with_error(str(e))
    return config
