"""Which directories a fine-tuning run may write, checked before any work.

A fine-tuning workdir holds `config.json`, `best/`, `finetune_results.json` (and
`merged/`); with `config.compare`, `--workdir` holds one such directory per method. A
run never writes into a pretraining run's workdir or an export (it would replace their
`config.json` and leave them unloadable), and a rerun on a fine-tuning workdir must have
the same config as the run there (`compare` aside, which only picks the methods): it then
trains again and replaces `best/`, `config.json` and `finetune_results.json` with the
same run's. A rerun with another config would leave the three describing different runs.
"""

from __future__ import annotations

import json
import os

import ml_collections

from lm.config import config_fields
from lm.files import paths
from lm.runs.artifacts import EXPORT_INFO
from lm.runs.workdir import WorkdirError

CONFIG = "config.json"
# Fields a rerun may change: `compare` picks which methods run, not how one runs.
RERUN_MAY_CHANGE = ("compare",)


def method_workdirs(workdir: str, config: ml_collections.ConfigDict) -> dict[str, str]:
    """Each method the config runs -> its workdir (`workdir/<method>` when comparing)."""
    if config.compare:
        return {method: os.path.join(workdir, method) for method in config.compare}
    return {config.finetune.method: workdir}


def check_workdirs(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises WorkdirError unless every workdir the config's methods write can take them
    (see `check_workdir`); `workdir` itself must be a directory or a new path."""
    _check_directory(workdir)
    saved = json.loads(config.to_json_best_effort())
    for method, path in method_workdirs(workdir, config).items():
        check_workdir(path, {**saved, "finetune": {**saved["finetune"], "method": method}})


def check_workdir(workdir: str, config_json: dict) -> None:
    """Raises WorkdirError unless `workdir` is new, empty of a run, or a fine-tuning workdir
    whose config.json equals `config_json` (the new run's config as JSON) but for
    `RERUN_MAY_CHANGE`."""
    _check_directory(workdir)
    saved = _saved_config(workdir)
    if saved is None:
        return
    old, new = config_fields(saved), config_fields(config_json)
    changed = [f"config.{field} was {old.get(field)!r}, now {new.get(field)!r}" for field in sorted(set(old) | set(new))
               if field.split(".")[0] not in RERUN_MAY_CHANGE and old.get(field) != new.get(field)]
    if changed:
        raise WorkdirError(f"{workdir} holds a fine-tuning run with another config ({'; '.join(changed)}); "
                           "rerunning there would replace its best/ and config.json. Fix: choose a new "
                           "--workdir, rerun with the same config, or delete the old run first.")


def _check_directory(workdir: str) -> None:
    """Raises WorkdirError if `workdir` is a file, lies under one, or holds a pretraining
    run or an export."""
    problem = paths.directory_problem(workdir)
    if problem:
        raise WorkdirError(f"--workdir {workdir}: {problem}. Fix: choose a new directory elsewhere.")
    what = ("an export (it has export.json)" if os.path.exists(os.path.join(workdir, EXPORT_INFO)) else
            "a pretraining run's workdir (it has checkpoints/)" if os.path.isdir(os.path.join(workdir, "checkpoints"))
            else None)
    if what is None and os.path.exists(os.path.join(workdir, CONFIG)) and _saved_config(workdir) is None:
        what = "a directory whose config.json is not a fine-tuning config"
    if what:
        raise WorkdirError(f"--workdir {workdir} is {what}; fine-tuning would replace its config.json. Fix: "
                           "give fine-tuning a new --workdir (the pretrained model goes in --config.init_from).")


def _saved_config(workdir: str) -> dict | None:
    """The fine-tuning config in `workdir/config.json`, or None (none there, or not a
    fine-tuning config: unreadable, or without the `finetune` and `task` sections)."""
    path = os.path.join(workdir, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"finetune", "task"} <= set(saved) else None
