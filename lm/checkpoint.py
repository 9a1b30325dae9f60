"""Checkpoints with orbax: the train state, the data iterator's position and metadata.

Two tiers: the newest `keep` checkpoints (frequent, for resuming), and every step that
is a multiple of `permanent_every` (sparse, kept forever). Orbax writes each step into
a temporary directory and renames it when complete, so a run killed mid-save never
leaves a checkpoint that looks finished; leftover temporary directories are removed
when the next run opens the directory.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

DATA = "data"  # the data iterator's position, one JSON file per process


class Checkpointer:
    def __init__(self, directory: str, keep: int = 1, permanent_every: int = 0, read_only: bool = False,
                 asynchronous: bool = True):
        """`read_only` for readers (sampling, export) of a workdir a run may be writing:
        they must neither delete nor clean up anything. `asynchronous=False` makes `save`
        return only once the checkpoint is on disk (bench/checkpoint.py compares the two)."""
        self.directory = directory = os.path.abspath(os.path.expanduser(directory))  # orbax needs absolute paths
        kept = policies.LatestN(keep)
        if permanent_every:
            kept = policies.AnyPreservationPolicy([kept, policies.EveryNSteps(permanent_every)])
        self._manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=kept, create=not read_only, cleanup_tmp_directories=not read_only,
            read_only=read_only, enable_async_checkpointing=asynchronous))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints on disk (orbax never lists an unfinished save)."""
        self._manager.reload()
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, meta: dict) -> None:
        """Starts an asynchronous save: returns once the arrays are copied off the devices,
        and training continues while they are written."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> tuple[Any, dict]:
        """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs), whatever
        mesh or process count wrote it, and moves `data_iterator` to the saved position."""
        args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        data_state = self._data_state_from_other_process_count(step)
        if data_state is None:
            args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        if data_state is not None:
            data_iterator.set_state(data_state)
        return restored["state"], restored["meta"]

    def _data_state_from_other_process_count(self, step: int) -> dict | None:
        """The saved data position if a different number of processes wrote it, else None.

        Every process's iterator stands at the same index, the step (lm.data.pipeline
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
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def metadata(self, step: int) -> dict:
        """The JSON metadata saved with `step`: step, config, code version."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
