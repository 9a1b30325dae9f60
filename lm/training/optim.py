"""Optimizer and learning-rate schedule from config (optax); fine-tuning builds its
optimizer from the same pieces (`learning_rate_schedule`, `adamw`).

`optim.name` picks the optimizer, all optax's own: AdamW (lm's default), Adam and SGD
(L2 weight decay added to the gradient, PyTorch's `weight_decay`), Adafactor, Lion, Muon
(`optax.contrib.muon` on the hidden matrices, AdamW on the rest) and schedule-free AdamW
(`optax.contrib.schedule_free`, whose evaluation parameters `eval_params` gives). Parameter
groups (`lm.training.param_groups`) set each group's rate multiplier and weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax
from optax import contrib

from lm.config import choices, schedule_fields
from lm.model import mup, param_kinds
from lm.training import param_groups, schedules
from lm.training.param_groups import Setting


def schedule(optim: ml_collections.ConfigDict, train_steps: int) -> optax.Schedule:
    """`optim.schedule` after linear warmup, over `decay_steps` (default: the whole run):
    one of lm.training.schedules' kinds, with its fields from `optim`."""
    return schedules.from_config(optim, train_steps)


def learning_rate_schedule(kind: str, lr: float, warmup: int, total: int, final_lr: float,
                           **options) -> optax.Schedule:
    """The rate at each step: linear warmup from 0 to `lr` over `warmup` steps, then
    `kind`, e.g. "cosine" or "linear" decay to `final_lr` at step `total`, "constant", or
    "rsqrt" (inverse square root of the step, from the warmup's end); `options` are the
    other kinds' fields (`lm.training.schedules.FIELDS`). Raises ValueError for an unknown `kind`."""
    return schedules.build(kind, lr, warmup, total, final_lr, **options)


def decay_mask(params: Any) -> Any:
    """True for kernels and embedding tables; norm scales, norm biases and biases are not
    decayed. Decided by what each parameter is (`lm.model.param_kinds`), never by its rank:
    scanned layers make every norm scale 2-D. Fine-tuning's tree {"backbone", "head",
    "lora"} gets the same rule: the head's kernel and LoRA's factors are kernels. Raises
    `param_kinds.UnknownParameterError` for a parameter name of no known kind."""
    return param_kinds.decay_mask(params)


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float, grad_clip: float, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on `decay_mask`'s parameters, after global-norm
    gradient clipping to `grad_clip` (0: no clipping)."""
    transform = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if not grad_clip:
        return transform
    return optax.chain(optax.clip_by_global_norm(grad_clip), transform)


Builder = Callable[[ml_collections.ConfigDict, optax.ScalarOrSchedule, float, Any], optax.GradientTransformation]


def make(optim: ml_collections.ConfigDict, train_steps: int, lr_multipliers: Mapping[str, float] | None = None
         ) -> optax.GradientTransformation:
    """`optim.name`'s optimizer on `schedule`'s rate, with each parameter group's rate
    multiplier and weight decay (`param_groups.resolve`; `lr_multipliers` scales groups'
    rates further, e.g. µP's), after global-norm gradient clipping to `optim.grad_clip`
    (0: none). The defaults are lm's AdamW, the same transformation and state as ever."""
    rate = schedule(optim, train_steps)
    settings = param_groups.resolve(optim, lr_multipliers)
    if optim.name == "muon":
        transform = _muon(optim, rate, settings)
    elif optim.name == "schedule_free_adamw":
        transform = _schedule_free_adamw(optim, rate, settings)
    else:
        transform = _grouped(_BUILDERS[optim.name], optim, rate, settings)
    if not optim.grad_clip:
        return transform
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), transform)


def _grouped(build: Builder, optim: ml_collections.ConfigDict, rate: optax.ScalarOrSchedule,
             settings: Mapping[str, Setting]) -> optax.GradientTransformation:
    """One optimizer with a decay mask when the groups allow it (the defaults do), else one
    optimizer per group (optax.partition) with the group's rate and decay."""
    if param_groups.uniform(settings):
        decay = max(s.weight_decay for s in settings.values())
        scale = next(iter(settings.values())).lr_scale
        return build(optim, param_groups.scaled(rate, scale), decay, param_groups.decay_mask(settings))
    return optax.partition({name: build(optim, param_groups.scaled(rate, s.lr_scale), s.weight_decay, None)
                            for name, s in settings.items()}, param_groups.labels)


def _adamw(optim, rate, decay, mask) -> optax.GradientTransformation:
    return optax.adamw(rate, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=decay, mask=mask)


def _adam(optim, rate, decay, mask) -> optax.GradientTransformation:
    # Adam has no decoupled decay: the decay joins the gradient (L2), as PyTorch's Adam does.
    return optax.chain(optax.add_decayed_weights(decay, mask),
                       optax.adam(rate, b1=optim.b1, b2=optim.b2, eps=optim.eps))


def _sgd(optim, rate, decay, mask) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(decay, mask),
                       optax.sgd(rate, momentum=optim.sgd.momentum or None, nesterov=optim.sgd.nesterov))


def _lion(optim, rate, decay, mask) -> optax.GradientTransformation:
    return optax.lion(rate, b1=optim.b1, b2=optim.b2, weight_decay=decay, mask=mask)


def _adafactor(optim, rate, decay, mask) -> optax.GradientTransformation:
    # optax's Adafactor adds its decay after the learning rate; times the rate here, it is
    # decoupled decay as AdamW's (optim.weight_decay means the same for every optimizer).
    decay_rate = (lambda step: decay * rate(step)) if callable(rate) else decay * rate
    return optax.adafactor(rate, weight_decay_rate=decay_rate, weight_decay_mask=mask)


_BUILDERS: dict[str, Builder] = {"adamw": _adamw, "adam": _adam, "sgd": _sgd, "lion": _lion, "adafactor": _adafactor}


def muon_dimensions(params: Any) -> Any:
    """`optax.contrib.MuonDimensionNumbers` of each kernel in `params` (`param_kinds.
    matrix_axes`: input axes are Muon's reduction axes, output axes its output axes, the
    layer stack and fused axes its batch of separate matrices)."""
    return jax.tree_util.tree_map_with_path(
        lambda keypath, x: contrib.MuonDimensionNumbers(*param_kinds.matrix_axes(param_kinds.path_names(keypath),
                                                                                  x.ndim)), params)


def muon_labels(params: Any) -> Any:
    """"muon" for the hidden matrices (the `matrix` group), "adamw" for every other parameter."""
    return param_kinds.map_paths(lambda path: "muon" if param_groups.group(path) == "matrix" else "adamw", params)


def _muon(optim, rate, settings: Mapping[str, Setting]) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024) on the hidden matrices, AdamW on embeddings, head, norms and
    biases, each group at its own rate and decay. optax's own split is by rank, which would
    send the embedding and head to Muon and every fused or scanned kernel to Adam: the split
    here is by what a parameter is, and every matrix gets its dimension numbers."""
    matrix = settings["matrix"]
    m = optim.muon
    # Every parameter it sees has dimension numbers, so its own Adam branch stays empty.
    hidden = contrib.muon(param_groups.scaled(rate, matrix.lr_scale), ns_steps=m.ns_steps, beta=m.momentum,
                          weight_decay=matrix.weight_decay, nesterov=m.nesterov,
                          muon_weight_dimension_numbers=muon_dimensions)
    rest = {name: s for name, s in settings.items() if name != "matrix"}
    return optax.partition({"muon": hidden, "adamw": _grouped(_adamw, optim, rate, rest)}, muon_labels)


def _schedule_free_adamw(optim, rate, settings: Mapping[str, Setting]) -> optax.GradientTransformation:
    """Schedule-free AdamW (Defazio et al. 2024): `optax.contrib.schedule_free_adamw`'s
    composition, with lm's decay mask and groups, which that function takes no argument
    for (it would decay norms and biases). One averaging over every group; the groups'
    rates and decays act on the base step."""
    if param_groups.uniform(settings):
        scale = next(iter(settings.values())).lr_scale
        step = optax.chain(optax.add_decayed_weights(max(s.weight_decay for s in settings.values()),
                                                     param_groups.decay_mask(settings)),
                           optax.scale_by_learning_rate(param_groups.scaled(rate, scale)))
    else:
        step = optax.partition({name: optax.chain(optax.add_decayed_weights(s.weight_decay),
                                                  optax.scale_by_learning_rate(param_groups.scaled(rate, s.lr_scale)))
                                for name, s in settings.items()}, param_groups.labels)
    base = optax.chain(optax.scale_by_rms(decay=optim.b2, eps=optim.eps, eps_in_sqrt=False, bias_correction=True),
                       step)
    return contrib.schedule_free(base, learning_rate=rate, b1=optim.b1)


# The sections of config.optim that one optimizer alone reads.
_OWN_SECTIONS = ("sgd", "muon")


def ignored_fields(optim: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(field, what reads it) for each field of `optim` set away from its default
    (lm.config.schema) that this run never reads: another optimizer's section (`optim.sgd`
    under adamw) or another schedule's fields (`optim.step_boundaries` under cosine). The
    run's set-up logs them, as it does a parameter group with no parameter."""
    from lm.config import schema  # late: a config module, only needed here

    default = schema.get_config().optim
    same = lambda a, b: (list(a) == list(b)) if isinstance(a, list | tuple) else a == b
    found = [(f"optim.{name}", f"optim.name={name!r}") for name in _OWN_SECTIONS
             if optim.name != name and optim[name].to_dict() != default[name].to_dict()]
    for kind, fields in schedules.FIELDS.items():
        found += [(f"optim.{f}", f"optim.schedule={kind!r}") for f in fields
                  if f not in schedules.FIELDS[optim.schedule] and not same(optim[f], default[f])]
    return found


def doubts(config: ml_collections.ConfigDict, params: Any) -> list[str]:
    """What the run's set-up warns about in its optimizer settings: a parameter group the
    model (`params`) has no parameter in, a field only another optimizer or schedule reads
    (`ignored_fields`), a schedule period longer than the run (`schedule_fields.doubts`)."""
    o = config.optim
    found = [f"config.optim.groups.{name} is set but this model has no parameter in the group {name!r} "
             f"({param_groups.EMPTY_BECAUSE[name]}); the setting has no effect."
             for name in param_groups.configured_but_empty(o, params)]
    found += [f"config.{field} is set but only {reader} reads it (this run has optim.name={o.name!r}, "
              f"optim.schedule={o.schedule!r}); the setting has no effect." for field, reader in ignored_fields(o)]
    return found + schedule_fields.doubts(o, config.train.steps)


def eval_params(optim: ml_collections.ConfigDict, opt_state: Any, params: Any) -> Any:
    """The parameters to evaluate, sample and export: `params` itself, except under
    schedule-free AdamW, whose train state holds the iterate y that gradients are taken at
    and the evaluation point is optax's `schedule_free_eval_params` (the average x)."""
    if optim.name not in choices.AVERAGED_OPTIMIZERS:
        return params
    state = opt_state if isinstance(opt_state, contrib.ScheduleFreeState) else opt_state[-1]
    return contrib.schedule_free_eval_params(state, params)


def eval_params_reader(config: ml_collections.ConfigDict, abstract_params: Any
                       ) -> tuple[Any, Callable[[Any, Any], Any]] | None:
    """For `lm.runs.artifacts.load` (its `eval_params`): None when a checkpoint's parameters
    are the ones to evaluate; else the run's optimizer state as abstract values (to restore
    beside the parameters) and `eval_params` of it, as (opt_state, params) -> params."""
    if config.optim.name not in choices.AVERAGED_OPTIMIZERS:
        return None
    # The run's own optimizer, µP's rates included.
    optimizer = make(config.optim, config.train.steps, mup.lr_multipliers(config.model, config.optim.name))
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    return abstract_opt_state, lambda opt_state, params: eval_params(config.optim, opt_state, params)
