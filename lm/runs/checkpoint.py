"""Checkpoints with orbax: the train state, the data iterator's position and metadata.

Two tiers: the newest `keep` checkpoints (frequent, for resuming), and every step that
is a multiple of `permanent_every` or one of `keep_steps` (sparse, kept forever: a WSD
run's branch points). Orbax writes each step into
a temporary directory and renames it when complete, so a run killed mid-save never
leaves a checkpoint that looks finished; leftover temporary directories are removed
when the next run opens the directory.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from lm.model import param_kinds

DATA = "data"  # the data iterator's position, one JSON file per process


class Checkpointer:
    def __init__(self, directory: str, keep: int = 1, permanent_every: int = 0, read_only: bool = False,
                 asynchronous: bool = True, keep_steps: Sequence[int] = ()):
        """`read_only` for readers (sampling, export) of a workdir a run may be writing:
        they read step directories with a synchronous orbax Checkpointer and hold no
        CheckpointManager, so they can neither save, delete nor clean up anything (and
        orbax has no read-only options to warn about). `asynchronous=False` makes `save`
        return only once the checkpoint is on disk (bench/checkpoint.py compares the two)."""
        self.directory = directory = os.path.abspath(os.path.expanduser(directory))  # orbax needs absolute paths
        self._manager = self._reader = None
        if read_only:
            self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
            return
        kept = [policies.LatestN(keep)] + ([policies.EveryNSteps(permanent_every)] if permanent_every else []) + (
            [policies.CustomSteps(keep_steps)] if keep_steps else [])
        kept = kept[0] if len(kept) == 1 else policies.AnyPreservationPolicy(kept)
        self._manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=kept, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous))
        # The manager removes an earlier attempt's unfinished saves in a thread it starts;
        # orbax 0.12 waits for it only before a save (not in close), so a process that ends
        # first (a run stopped during start-up) prints the thread's traceback. Waited for here.
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        try:
            if cleanup is not None:
                cleanup.result()
        except BaseException:
            self._manager.close()
            raise

    def latest_step(self) -> int | None:
        if self._manager is not None:
            return self._manager.latest_step()
        return max(self.all_steps(), default=None)

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints on disk (orbax never lists an unfinished save)."""
        if self._manager is None:
            return finished_steps(self.directory)
        self._manager.reload()
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, meta: dict) -> None:
        """Starts an asynchronous save: returns once the arrays are copied off the devices,
        and training continues while they are written."""
        self._writer().save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> tuple[Any, dict]:
        """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs), whatever
        mesh or process count wrote it, and moves `data_iterator` to the saved position.
        Read-only checkpointers restore too (a branch starts from another run's checkpoint)."""
        args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        data_state = self._data_state_from_other_process_count(step)
        if data_state is None:
            args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._read(step, **args)
        if data_state is not None:
            data_iterator.set_state(data_state)
        return restored["state"], restored["meta"]

    def _data_state_from_other_process_count(self, step: int) -> dict | None:
        """The saved data position if a different number of processes wrote it, else None.

        Every process's iterator stands at the same index, the step (lm.data.batches
        gives process p batch s*P + p as its element s), so any process's state serves.
        """
        data_dir = os.path.join(self.directory, str(step), DATA)
        own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        written = sorted(glob.glob(os.path.join(data_dir, "process_*-of-*.json")))
        if os.path.exists(own) or not written:
            return None  # the usual case, or a damaged checkpoint that the normal restore reports
        states = []
        for path in written:
            with open(path, encoding="utf-8") as f:
                states.append(json.load(f))
        if any(s != states[0] for s in states):
            raise ValueError(f"the data positions in {data_dir} differ between processes: {states}")
        logging.warning("lm: the checkpoint at step %d was written by %d processes; this run has %d. Every "
                        "process resumes the data at %s.", step, len(written), jax.process_count(), states[0])
        return states[0]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the train state (for sampling, evaluation or export)."""
        return self._read(step, state=ocp.args.StandardRestore(abstract_state))["state"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the train state's `params` (for sampling, evaluation or export), onto the
        shardings in `abstract_params` (ShapeDtypeStructs); the optimizer state stays on
        disk, so a reader needs neither the optimizer nor memory for its moments."""
        target = {"params": abstract_params}
        restored = self._read(step, state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        return restored["state"]["params"]

    def restore_params_and_opt_state(self, step: int, abstract_params: Any, abstract_opt_state: Any
                                     ) -> tuple[Any, Any]:
        """`restore_params` with the optimizer state too (what schedule-free's evaluation
        parameters are computed from), without the step count, RNG or data position."""
        target = {"params": abstract_params, "opt_state": abstract_opt_state}
        restored = self._read(step, state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        return restored["state"]["params"], restored["state"]["opt_state"]

    def metadata(self, step: int) -> dict:
        """The JSON metadata saved with `step`: step, config, code version."""
        return self._read(step, meta=ocp.args.JsonRestore())["meta"]

    def state_mismatches(self, step: int, abstract_state: Any) -> list[str]:
        """How the arrays stored at `step` differ from `abstract_state`'s, by path (missing,
        unexpected, or another shape or dtype); empty when a restore can fit them. Reads
        only the checkpoint's array metadata, so an incompatible state is told apart from
        a damaged one without a restore that fails (orbax's failing restores also spill
        "Event loop is closed" tracebacks from their reader threads)."""
        stored = stored_shapes(os.path.join(self.directory, str(step), "state"))
        return tree_mismatches(stored, shapes_by_path(abstract_state))

    def params_mismatches(self, step: int, abstract_params: Any) -> list[str]:
        """`state_mismatches` of the parameters alone (what `restore_params` reads)."""
        state = stored_shapes(os.path.join(self.directory, str(step), "state"))
        stored = {path: shape for path, shape in state.items() if path.startswith("params/")}
        return tree_mismatches(stored, shapes_by_path({"params": abstract_params}),
                               wanter="config.json", wanted_tree="parameters")

    def _read(self, step: int, **items: Any) -> Any:
        if self._manager is not None:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        return self._reader.restore(os.path.join(self.directory, str(step)), args=ocp.args.Composite(**items))

    def _writer(self) -> ocp.CheckpointManager:
        if self._manager is None:
            raise ValueError(f"{self.directory} was opened read_only; saving and resuming need a Checkpointer "
                             "opened without it.")
        return self._manager

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes saves under way and stops orbax's background threads; call on every exit."""
        for opened in (self._manager, self._reader):
            if opened is not None:
                opened.close()


def finished_steps(directory: str) -> list[int]:
    """Steps of the finished checkpoints in `directory` ([] when it does not exist), opening
    nothing: what a sweep polls while a branch waits for its parent's checkpoint."""
    return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def stored_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`shapes_by_path` of the arrays an orbax standard save wrote into `directory` (a
    checkpoint's `state`, an export's `params`), read from its metadata alone."""
    return shapes_by_path(ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.abspath(directory))).tree)


def shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'params/embed/embedding' -> (shape, dtype) for each array (or array metadata) in
    `tree`; attribute names, dict keys and sequence indices all become path parts, so a
    dataclass state and the nested dicts orbax stores for it agree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(param_kinds.path_names(path)): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def tree_mismatches(stored: dict[str, tuple], wanted: dict[str, tuple], limit: int = 5, where: str = "the checkpoint",
                    wanter: str = "this config", wanted_tree: str = "state") -> list[str]:
    """Up to `limit` differences between two `shapes_by_path` maps, described (parameters
    first: the optimizer's moments repeat them), and a count of the rest. `where` names
    what stored the arrays, `wanter` what asks for them and `wanted_tree` which arrays."""
    order = lambda paths: sorted(paths, key=lambda p: (not p.startswith("params/"), p))
    out = [f"{p} is missing from {where}" for p in order(set(wanted) - set(stored))]
    out += [f"{p} is in {where} but not in {wanter}'s {wanted_tree}" for p in order(set(stored) - set(wanted))]
    out += [f"{p} is stored as {stored[p][0]} {stored[p][1]}, {wanter} needs {wanted[p][0]} {wanted[p][1]}"
            for p in order(set(stored) & set(wanted)) if stored[p] != wanted[p]]
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])
