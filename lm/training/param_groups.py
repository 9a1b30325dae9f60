"""Optimizer parameter groups: each parameter's group, from what it is, and each group's
learning-rate multiplier and weight decay (config `optim.groups`).

| group       | parameters (`lm.model.param_kinds`)                          | default decay |
|-------------|--------------------------------------------------------------|---------------|
| `matrix`    | hidden kernels (attention, MLP, `mlm_dense`), LoRA factors   | optim.weight_decay |
| `embedding` | the token table (also the head when tied), position tables   | optim.weight_decay |
| `head`      | the untied output projection `unembed/kernel`                | optim.weight_decay |
| `norm`      | norm scales and norm biases                                  | 0 |
| `bias`      | biases of dense layers, `mlm_bias`                           | 0 |

The defaults reproduce lm's AdamW exactly (`optim.decay_mask`'s rule, one rate). Muon
(`optim.name="muon"`) updates the `matrix` group and AdamW the rest. µP scales the groups'
rates by the width multiplier, and their decay inversely, through `resolve`'s
`lr_multipliers` (a run's config keeps the user's own `lr_scale`s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

from lm.config.choices import PARAM_GROUPS as GROUPS
from lm.config.choices import SAME_AS_OPTIM, groups_share_one_optimizer
from lm.model import param_kinds


@dataclasses.dataclass(frozen=True)
class Setting:
    """One group's learning-rate multiplier (of the schedule's rate) and decoupled weight decay."""

    lr_scale: float
    weight_decay: float


def group(path: tuple[str, ...]) -> str:
    """The group of the parameter at `path` (keys from the tree's root). Raises
    `param_kinds.UnknownParameterError` for a name of no known kind."""
    k = param_kinds.kind(path)
    if k in (param_kinds.Kind.TOKEN_EMBEDDING, param_kinds.Kind.POSITION_EMBEDDING):
        return "embedding"
    if k in (param_kinds.Kind.NORM_SCALE, param_kinds.Kind.NORM_BIAS):
        return "norm"
    if k is param_kinds.Kind.BIAS:
        return "bias"
    return "head" if param_kinds.is_head(path) else "matrix"


def labels(params: Any) -> Any:
    """The tree of `params` with each leaf's group name (optax.partition's labels)."""
    return param_kinds.map_paths(group, params)


def resolve(optim: ml_collections.ConfigDict, lr_multipliers: Mapping[str, float] | None = None
            ) -> dict[str, Setting]:
    """Each group's setting from `optim.groups` (weight_decay -1: optim.weight_decay),
    its lr_scale multiplied by `lr_multipliers[group]` where given (µP's width scaling)
    and its weight decay divided by it. optax multiplies decoupled decay (adamw, lion,
    adafactor, muon's AdamW, schedule-free) by the rate, so its decay per step (rate x
    decay) stays the base width's, and AdamW's decay timescale 1 / (rate x decay) is the
    same at every width (Wang & Aitchison 2024, "How to set AdamW's weight decay as you
    scale model and dataset size"). That is the `mup` package's rule (MuAdamW and MuAdam,
    decoupled_wd=False: weight_decay *= width_mult), which applies it to Adam's L2 decay
    (added to the gradient before Adam normalises it) alike; lm does the same for `adam`."""
    multipliers = dict(lr_multipliers or {})
    unknown = set(multipliers) - set(GROUPS)
    if unknown:
        raise ValueError(f"lr_multipliers names no group: {sorted(unknown)}; the groups are {GROUPS}")
    settings = {}
    for name in GROUPS:
        g = optim.groups[name]
        decay = optim.weight_decay if g.weight_decay == SAME_AS_OPTIM else g.weight_decay
        multiplier = multipliers.get(name, 1.0)
        settings[name] = Setting(g.lr_scale * multiplier, decay / multiplier)
    return settings


# Why a group can hold no parameter, for the trainer's warning.
EMPTY_BECAUSE = {"matrix": "no hidden kernels", "embedding": "no embedding tables",
                 "head": "the head is the token embedding when model.tie_embeddings=True; group 'embedding' sets it",
                 "norm": "no norm parameters", "bias": "biases come with model.use_bias=True"}


def configured_but_empty(optim: ml_collections.ConfigDict, params: Any) -> list[str]:
    """The groups whose `optim.groups` entry differs from the default (lm.config.schema)
    but that hold no parameter of `params` (e.g. `head` with tied embeddings, `bias` in a
    model without biases): their setting has no effect, which the trainer logs."""
    from lm.config import schema  # late: a config module, only needed here

    default = schema.get_config().optim.groups
    changed = [name for name in GROUPS if optim.groups[name].to_dict() != default[name].to_dict()]
    present = set(jax.tree_util.tree_leaves(labels(params))) if changed else set()  # defaults: no labelling at all
    return [name for name in changed if name not in present]


def uniform(settings: Mapping[str, Setting]) -> bool:
    """Whether one optimizer with a decay mask serves every group: one rate multiplier, and
    at most one nonzero weight decay."""
    return groups_share_one_optimizer((s.lr_scale for s in settings.values()),
                                      (s.weight_decay for s in settings.values()))


def decay_mask(settings: Mapping[str, Setting]):
    """optax's `mask` (a function of the parameters): True where the group decays."""
    decays = {name for name, s in settings.items() if s.weight_decay}
    if not decays:  # no decay at all: lm's usual mask, so a run without decay computes as before
        return param_kinds.decay_mask
    return lambda params: param_kinds.map_paths(lambda path: group(path) in decays, params)


def scaled(rate: optax.ScalarOrSchedule, scale: float) -> optax.ScalarOrSchedule:
    """`rate` (a number or a schedule) times `scale`; `rate` itself when `scale` is 1."""
    if scale == 1.0:
        return rate
    return (lambda step: scale * rate(step)) if callable(rate) else scale * rate
