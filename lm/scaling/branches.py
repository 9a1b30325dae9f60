"""Branches in a sweep: points that start from another point's checkpoint
(`train.branch_from`, `train.branch_step`), such as the WSD cooldowns of
`lm.scaling.designs.wsd_branches`.

In a sweep a branch names its parent by the parent's directory relative to the sweep's,
`points/<name>` (so a sweep moved elsewhere keeps its point names); the runner passes
lm.main the absolute path. A branch may start once its parent has written the checkpoint
at `branch_step`; this module says which points are branches, whether one can start, and
how the compute a sweep spent splits over its rows (the parent's share counted once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from lm.config import resume_conflicts
from lm.errors import UsageError

PREFIX = "points/"  # a branch's train.branch_from in a sweep: PREFIX + its parent's name


class BranchError(UsageError):
    """A sweep point that branches from no point of the sweep, or from a step its parent never keeps."""


def parent_name(overrides: Mapping[str, Any]) -> str | None:
    """The name of the point `overrides` branch from, or None for a point that is no branch
    of a sweep point (no `train.branch_from`, or an absolute path: a run outside the sweep)."""
    source = overrides.get("train.branch_from", "")
    return source[len(PREFIX):] if isinstance(source, str) and source.startswith(PREFIX) else None


def resolved(overrides: Mapping[str, Any], sweep_dir: str) -> dict[str, Any]:
    """`overrides` with a relative `train.branch_from` made absolute against `sweep_dir`."""
    source = overrides.get("train.branch_from", "")
    if not source or os.path.isabs(os.path.expanduser(source)):
        return dict(overrides)
    return {**overrides, "train.branch_from": os.path.join(sweep_dir, source)}


def check(points: Iterable, configs: Mapping[str, Any]) -> None:
    """Raises BranchError unless every branch's parent is a point of the sweep (not a
    branch itself) that keeps the checkpoint at its `branch_step`: one of the parent's
    `train.keep_steps`, a multiple of its `permanent_checkpoint_every` or its last step.
    `points` are lm.scaling.sweeps.Points; `configs` their configs by name."""
    points = list(points)
    by_name = {p.name: p for p in points}
    for point in points:
        source, parent = point.overrides.get("train.branch_from", ""), parent_name(point.overrides)
        if not source or os.path.isabs(os.path.expanduser(source)):
            continue
        if parent not in by_name or parent_name(by_name[parent].overrides):
            raise BranchError(f"{point.label} sets train.branch_from={source!r}, which is no point of the sweep "
                              f"that is not itself a branch. Fix: use {PREFIX}<name of the stable run's point> "
                              "(lm.scaling.designs.wsd_branches writes it), or an absolute workdir.")
        step, t = configs[point.name].train.branch_step, configs[parent].train
        every = t.permanent_checkpoint_every
        if step not in t.keep_steps and step != t.steps and not (every and step % every == 0):
            raise BranchError(f"{point.label} branches at step {step} of {by_name[parent].label}, which never keeps "
                              f"that checkpoint (its train.keep_steps={tuple(t.keep_steps)}). Fix: add {step} to "
                              "the parent's train.keep_steps.")
        # The check lm.main makes when the branch starts, made before the parent has trained for it.
        as_json = lambda config: json.loads(config.to_json_best_effort())
        if conflicts := resume_conflicts(as_json(configs[parent]), as_json(configs[point.name])):
            raise BranchError(f"{point.label} differs from {by_name[parent].label}, which it branches from, in "
                              f"fields a branch cannot change: {'; '.join(conflicts)}. Fix: change only the "
                              "schedule and steps in a branch (as lm.scaling.designs.wsd_branches does).")


def ready(point, checkpoint_steps: Iterable[int]) -> bool:
    """Whether the branch `point` can start: its parent's finished checkpoints (steps) hold its branch step."""
    return point.overrides.get("train.branch_step") in set(checkpoint_steps)


def spent_steps(point, points: Iterable, steps: Mapping[str, int]) -> int:
    """The training steps the sweep spent for `point`'s row: its own steps for a point that
    is no branch; for a branch, its steps after the branch point plus the parent's steps
    since the previous branch point of the same parent (the parent's steps past its last
    branch point go to the branch there). Summed over a parent's branches, the parent's
    steps count once. `steps` is each point's train.steps by name."""
    parent = parent_name(point.overrides)
    if parent is None:
        return steps[point.name]
    siblings = sorted((p for p in points if parent_name(p.overrides) == parent),
                      key=lambda p: (p.overrides["train.branch_step"], p.name))
    at = point.overrides["train.branch_step"]
    previous = 0
    for sibling in siblings:
        if sibling.name == point.name:
            break
        previous = sibling.overrides["train.branch_step"]
    share = at - previous
    if point.name == siblings[-1].name:
        share += steps[parent] - at
    return steps[point.name] - at + share


def parents(points: Iterable) -> set[str]:
    """Names of the points some other point branches from (stable runs: no results row of their own)."""
    return {name for p in points if (name := parent_name(p.overrides)) is not None}
