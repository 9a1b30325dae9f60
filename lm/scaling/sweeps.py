"""A sweep: the points of a config file's `get_sweep()`, named by their content, checked
before anything runs, and each point's status and results read from its workdir.

Layout of a sweep directory:
    points/<name>/      the point's lm.main workdir (checkpoints, metrics, final_metrics.json)
    points/<name>/sweep.json   its overrides, and wall seconds summed over attempts
    results.csv, results.jsonl  one row per finished point (rows are never dropped)

A point may branch from another's checkpoint (`lm.scaling.branches`): its row is that of a
run of its own steps, and `spent_tokens` / `spent_flops` say what the sweep actually spent
for it (the stable run it branches from counted once over its branches, which has no row).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections

from lm.config import config_fields, stored_fields
from lm.errors import UsageError
from lm.files import atomic, paths
from lm.scaling import branches

SCALARS = (bool, int, float, str)
COLUMNS = ("name", "parameters", "non_embedding_parameters", "tokens", "flops", "budget", "target_parameters",
           "train_loss", "val_loss", "val_bits_per_byte", "wall_seconds", "spent_tokens", "spent_flops", "parent",
           "overrides")


class SweepError(UsageError):
    """A sweep config, or a file of the sweep's directory, that cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Point:
    name: str  # the hash of the overrides: its directory, points/<name>
    overrides: dict[str, Any]
    index: int = 0  # its place in get_sweep()'s list, as the user counts in the file (from 0)

    @property
    def label(self) -> str:
        """How messages name the point: its index in get_sweep()'s list and its overrides."""
        return f"sweep point {self.index} ({json.dumps(self.overrides, sort_keys=True)})"

    def flags(self) -> list[str]:
        """lm.main's `--config.<field>=<value>` arguments (each one argument, never split by a
        shell: a string goes as it is, since ml_collections would keep quotes around it)."""
        return [f"--config.{key}={value}" for key, value in self.overrides.items()]


def load(config_arg: str) -> tuple[ml_collections.ConfigDict, list[Point]]:
    """The base config and the named points of `get_sweep()` in the config file `path[:arg]`."""
    path, _, arg = config_arg.partition(":")
    if not os.path.exists(path):
        raise UsageError(f"the sweep config {path} does not exist. Fix: --config=configs/scaling/<file>.py")
    spec = importlib.util.spec_from_file_location("lm_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    _run_user_code(path, "could not be loaded", lambda: spec.loader.exec_module(module))
    if not hasattr(module, "get_sweep"):
        raise UsageError(f"{path} has no get_sweep(). Fix: define get_sweep() beside get_config(), returning a "
                          "list of override dicts (see lm.scaling.designs).")
    args = (arg,) if arg else ()
    config = _run_user_code(path, "failed in get_config()", lambda: module.get_config(*args), arg)
    overrides = _run_user_code(path, "failed in get_sweep()", lambda: module.get_sweep(*args), arg)
    if not isinstance(overrides, list | tuple) or not all(isinstance(point, dict) for point in overrides):
        raise SweepError(f"get_sweep() of {path} returned {json.dumps(overrides, default=repr)[:80]}. Fix: return a "
                         "list of override dicts, e.g. [{\"model.d_model\": 64}, {\"model.d_model\": 128}].")
    return config, name_points(list(overrides), config)


def _run_user_code(path: str, failed: str, call: Callable[[], Any], arg: str = "") -> Any:
    """`call()`, code of the sweep config `path` (given the argument `arg` after its ':');
    whatever it raises is a SweepError saying it `failed` (e.g. "failed in get_sweep()"),
    the error and its line in `path`."""
    try:
        return call()
    except Exception as e:  # the user's code: any error is theirs to fix
        if isinstance(e, SyntaxError):  # the line only when in this file, not in a module it imports
            same = os.path.abspath(e.filename or "") == os.path.abspath(path)
            detail, line = (e.msg, e.lineno) if same else (str(e), None)
        else:
            frames = [f for f in traceback.extract_tb(e.__traceback__)
                      if os.path.abspath(f.filename) == os.path.abspath(path)]
            detail, line = (str(e).splitlines() or [""])[0], frames[-1].lineno if frames else None
        # The user's message may say its own fix; else the file, or the argument it was given, is at fault.
        fix = "" if "Fix:" in detail else f" Fix: correct the file{f' or its argument {arg!r}' if arg else ''}."
        raise SweepError(f"the sweep config {path} {failed}: {type(e).__name__}: {detail.rstrip('.')}"
                         f"{f' (line {line})' if line else ''}.{fix}") from None


def name_points(overrides: list[dict], config: ml_collections.ConfigDict) -> list[Point]:
    """Points named by a hash of their overrides (so a point keeps its directory when the
    sweep gains or loses others), after checking each override names a field and that no
    two points are the same run."""
    if not overrides:
        raise UsageError("get_sweep() returned no points. Fix: return a non-empty list of override dicts.")
    points, seen = [], {}
    for i, point in enumerate(overrides):
        for key, value in point.items():
            _check_override(config, key, value, i)
        digest = point_name(point)
        if digest in seen:
            raise UsageError(f"sweep points {seen[digest]} and {i} are the same run ({json.dumps(point)}). "
                              "Fix: remove the duplicate, or make the points differ (e.g. the seed).")
        seen[digest] = i
        points.append(Point(digest, dict(point), i))
    return points


def point_name(overrides: dict[str, Any]) -> str:
    """A point's name and directory: a hash of its overrides."""
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def _check_override(config: ml_collections.ConfigDict, key: str, value: Any, index: int) -> None:
    node = config
    *sections, field = key.split(".")
    for section in sections:
        node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
        raise UsageError(f"sweep point {index} sets {key!r}, which is not a config field. Fix: use a dotted "
                          "field of lm/config/schema.py, e.g. 'model.d_model'.")
    if not isinstance(value, SCALARS) and not (isinstance(value, tuple) and all(isinstance(v, SCALARS) for v in value)):
        raise UsageError(f"sweep point {index} sets {key}={value!r}; a sweep overrides single values and tuples "
                          "of them only. Fix: use a number, string, bool or a tuple of them.")


def apply(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
    """A copy of `config` with the point's overrides."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in point.overrides.items():
        *sections, field = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[field] = value
    return config


def point_dir(sweep_dir: str, point: Point) -> str:
    return os.path.join(sweep_dir, "points", point.name)


def is_finished(sweep_dir: str, point: Point, steps: int) -> bool:
    final = _read_record(point_dir(sweep_dir, point), "final_metrics.json")
    return bool(final) and final.get("step") == steps


# Fields a point's stored config may differ in from the sweep's: where it runs (lm.sweep sets
# mesh.cpu_devices from --parallel) and how its layout is sharded, not what it computes.
_WHERE_IT_RAN = ("mesh.", "sharding.")


def changed_points(sweep_dir: str, points: list[Point], configs: dict[str, ml_collections.ConfigDict]
                   ) -> list[tuple[Point, str]]:
    """For each point that has run in `sweep_dir` (its config.json exists) with a config
    other than `configs[name]`, the one it would run now: (the point, "config.F was OLD, now
    NEW; ..." (at most 3 fields)). Point names hash only the overrides, so an edited
    sweep file or another recipe argument (a seed, a shape) names the same points: without
    this check a finished point would be reported with the old config's results."""
    found = []
    for point in points:
        stored = _read_record(point_dir(sweep_dir, point), "config.json")
        if stored is None:
            continue
        # A field the stored config predates (an older lm) counts as its default, as on resume;
        # one it has that lm no longer knows is not compared. Both sides are JSON (lists, not tuples).
        old = stored_fields(stored)
        new = config_fields(json.loads(configs[point.name].to_json_best_effort()))
        diffs = [f"config.{f} was {old.get(f)!r}, now {new[f]!r}" for f in sorted(new)
                 if not f.startswith(_WHERE_IT_RAN) and f != "train.branch_from"  # a path, made absolute
                 and old.get(f) != new[f]]
        if diffs:
            more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            found.append((point, f"{'; '.join(diffs[:3])}{more}"))
    return found


def describe_changes(changed: list[tuple[Point, str]]) -> str:
    """`changed_points`'s findings, one clause per distinct change with the points it
    applies to (a reseeded sweep's points all say the same): "CHANGE (sweep point 3 (its
    overrides))" for one point, "CHANGE (sweep points 0, 1, 2)" for several, joined by " | "."""
    by_change: dict[str, list[Point]] = {}
    for point, change in changed:
        by_change.setdefault(change, []).append(point)
    named = lambda points: points[0].label if len(points) == 1 else \
        f"sweep points {', '.join(str(p.index) for p in points)}"
    return " | ".join(f"{change} ({named(points)})" for change, points in by_change.items())


def add_wall_seconds(sweep_dir: str, point: Point, seconds: float) -> None:
    path = os.path.join(point_dir(sweep_dir, point), "sweep.json")
    record = _read_record(point_dir(sweep_dir, point), "sweep.json") or {
        "overrides": point.overrides, "wall_seconds": 0.0, "attempts": 0}
    record["wall_seconds"] += seconds
    record["attempts"] += 1
    atomic.write_json(path, record, indent=2)


def result_row(sweep_dir: str, point: Point, spent_steps: int | None = None) -> dict[str, Any]:
    """The results-table row of a finished point. `spent_steps` (lm.scaling.branches.spent_steps,
    default: the point's own steps) gives the compute the sweep spent for it."""
    directory = point_dir(sweep_dir, point)
    final = _read_record(directory, "final_metrics.json")
    config = _read_record(directory, "config.json")
    record = _read_record(directory, "sweep.json") or {}
    train_loss = None
    with open(os.path.join(directory, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            try:
                train_loss = json.loads(line).get("train/loss", train_loss)
            except json.JSONDecodeError:  # a line cut short by a kill; the resumed run logged on after it
                continue
    sweep = config.get("sweep", {})
    spent = (final["step"] if spent_steps is None else spent_steps) / final["step"]
    return {"name": point.name, "parameters": final["parameters"],
            "non_embedding_parameters": final["non_embedding_parameters"], "tokens": final["train_tokens"],
            "flops": final["train_flops"], "budget": sweep.get("budget", 0.0),
            "target_parameters": sweep.get("target_parameters", 0.0), "train_loss": train_loss,
            "val_loss": final["validation/loss"], "val_bits_per_byte": final.get("validation/bits_per_byte"),
            "wall_seconds": round(record.get("wall_seconds", 0.0), 1),
            "spent_tokens": round(final["train_tokens"] * spent), "spent_flops": final["train_flops"] * spent,
            "parent": branches.parent_name(point.overrides) or "",
            "overrides": json.dumps(point.overrides, sort_keys=True)}


def result_rows(sweep_dir: str, done: list[Point], points: list[Point], steps: dict[str, int]) -> list[dict[str, Any]]:
    """The rows of the finished points `done` of the sweep's `points` (whose train.steps
    are `steps`, by name), with the compute spent for each (`branches.spent_steps`); a
    stable run that others branch from has no row: its compute is in theirs."""
    stable = branches.parents(points)
    return [result_row(sweep_dir, p, branches.spent_steps(p, points, steps)) for p in done if p.name not in stable]


def read_results(sweep_dir: str) -> dict[str, dict[str, Any]]:
    """The rows of the sweep's results.jsonl by name ({} before the first point finishes).
    Raises SweepError naming the line that is not JSON: the table is then never rewritten,
    so no row is lost."""
    path = os.path.join(sweep_dir, "results.jsonl")
    if not os.path.exists(path):
        return {}
    fix = f"delete {path} and rerun the sweep: the rows of its finished points are collected again from points/."
    with open(path, encoding="utf-8") as f:
        rows = [paths.loads(line, f"{path}:{number}", fix) for number, line in enumerate(f, start=1)
                if line.strip()]
    if not all(isinstance(row, dict) and "name" in row for row in rows):
        raise SweepError(f"{path} holds a line that is not a results row. Fix: {fix}")
    return {row["name"]: row for row in rows}


def write_results(sweep_dir: str, rows: list[dict[str, Any]]) -> str:
    """Merges `rows` into the sweep's results table by name (existing rows are kept, never
    dropped) and writes results.csv and results.jsonl, each replaced whole. Returns the CSV path."""
    csv_path, jsonl_path = os.path.join(sweep_dir, "results.csv"), os.path.join(sweep_dir, "results.jsonl")
    merged = read_results(sweep_dir)
    merged.update({row["name"]: row for row in rows})
    ordered = sorted(merged.values(), key=lambda row: (float(row["flops"]), row["name"]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(ordered)
    atomic.write_text(csv_path, text.getvalue())
    atomic.write_text(jsonl_path, "".join(json.dumps(row) + "\n" for row in ordered))
    return csv_path


# What to do about each file of a point's directory that is not JSON.
_FIXES = {"final_metrics.json": "delete it and rerun the sweep: the point resumes from its last checkpoint and "
                                "writes it again.",
          "sweep.json": "delete it (it only sums the point's wall time and attempts) and rerun the sweep.",
          "config.json": "the point's run is damaged: delete its directory and rerun the sweep to train it again."}


def _read_record(directory: str, name: str) -> dict | None:
    """The JSON object in `directory`/`name`, None when absent; SweepError when it is not
    a JSON object (a damaged file), naming it and the fix."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    record = paths.read_json(path, _FIXES[name])
    if not isinstance(record, dict):
        raise SweepError(f"{path} is not a JSON object. Fix: {_FIXES[name]}")
    return record
