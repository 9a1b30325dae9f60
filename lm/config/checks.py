"""The primitives of config validation: `ConfigError` and the checks that raise it, each
message "config.FIELD=VALUE PROBLEM. Fix: FIX.". `lm.config.validation` holds the rules
of lm's configs; fine-tuning's (`lm.config.finetune`) use the same primitives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import ml_collections

from lm.errors import UsageError


class ConfigError(UsageError):
    """A config that cannot run. The message names the field, its value and the fix."""


def fail(field: str, value: Any, problem: str, fix: str) -> None:
    """Raises ConfigError "config.FIELD=VALUE PROBLEM. Fix: FIX."."""
    raise ConfigError(f"config.{field}={value!r} {problem}. Fix: {fix}.")


def require_choice(config: ml_collections.ConfigDict, field: str, allowed: Iterable[str]) -> None:
    """Raises ConfigError, listing `allowed`, unless the dotted `field` holds one of them."""
    value = field_value(config, field)
    if value not in allowed:
        fail(field, value, "is not a known choice", f"use one of {', '.join(map(repr, allowed))}")


def require_positive(config: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
    """Raises ConfigError unless the dotted `field` is a finite number > 0 (>= 0 with `allow_zero`)."""
    value = field_value(config, field)
    _require_finite_value(field, value)
    if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        fail(field, value, "must be " + ("zero or positive" if allow_zero else "positive"),
             "set a value " + (">= 0" if allow_zero else "> 0"))


def require_finite(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first float of `config` (sections, tuples and dicts
    inside it included) that is NaN or infinite. No field of lm's configs means anything
    there, and range checks pass NaN (every comparison with it is false): a NaN learning
    rate would train until the run diverged, after writing checkpoints."""
    for field, value in _leaves(config):
        _require_finite_value(field, value)


def _require_finite_value(field: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        fail(field, value, "is not a finite number", "give a finite number (nan and inf are no field's value)")


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted field, value) of every leaf below `node`; tuple items are named `field[i]`."""
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (tuple, list)):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, node


def field_value(config: ml_collections.ConfigDict, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node
