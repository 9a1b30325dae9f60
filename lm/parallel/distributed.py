"""Multi-process runs: who the coordinator is, how many processes, which one this is.

`lm.main` calls `initialize` before JAX starts. The settings come, first match wins, from
explicit flags (`--coordinator_address --num_processes --process_id`), from `LM_*`
environment variables of the same names, from SLURM's variables (one process per task),
or, with `--distributed` alone on a TPU VM slice or another cluster JAX knows, from
JAX's own detection. With none of these the run is one process.

    python -m lm.distributed     # prints what this process would use (lm/distributed.py)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax

SLURM_PORT_BASE = 61000  # the coordinator listens on 61000 + (job id mod 4096), as JAX's SLURM support does


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator_address: str | None  # None: let JAX detect everything (TPU VM slices)
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None  # the devices this process drives (None: all local ones)
    source: str  # "flags", "environment", "slurm" or "jax"

    def describe(self) -> str:
        if self.coordinator_address is None:
            return f"{self.source}: JAX detects the coordinator, process count and id"
        devices = ("all local devices" if self.local_device_ids is None
                   else f"local devices {list(self.local_device_ids)}")
        return (f"{self.source}: process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator_address}, {devices}")


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") as host names."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}")
    return hosts


def from_slurm(env: Mapping[str, str]) -> Cluster | None:
    """One process per SLURM task; with several tasks on a node, each drives the GPU of its local id."""
    tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if "SLURM_JOB_ID" not in env or tasks < 2:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % 4096
    tasks_per_node = int(re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", "1"))[0])
    local = (int(env.get("SLURM_LOCALID", "0")),) if tasks_per_node > 1 else None
    return Cluster(f"{expand_hostlist(nodelist)[0]}:{port}", tasks, int(env.get("SLURM_PROCID", "0")), local, "slurm")


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, distributed: bool = False,
            env: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster this process belongs to, or None for a single-process run."""
    if coordinator_address or num_processes is not None or process_id is not None:
        missing = [name for name, value in (("coordinator_address", coordinator_address),
                                            ("num_processes", num_processes), ("process_id", process_id))
                   if value is None or value == ""]
        if missing:
            raise ValueError(f"--{' --'.join(missing)} missing: an explicit cluster needs all of "
                             "--coordinator_address, --num_processes and --process_id. Fix: give all three, "
                             "or --distributed alone to let the environment (SLURM, TPU VM) say.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes}). "
                             f"Fix: number processes 0 to {num_processes - 1}.")
        return Cluster(coordinator_address, num_processes, process_id, None, "flags")
    if env.get("LM_COORDINATOR_ADDRESS"):
        return Cluster(env["LM_COORDINATOR_ADDRESS"], int(env["LM_NUM_PROCESSES"]), int(env["LM_PROCESS_ID"]),
                       None, "environment")
    if not distributed:
        return None
    return from_slurm(env) or Cluster(None, None, None, None, "jax")


def initialize(cluster: Cluster | None) -> None:
    """Starts JAX's multi-controller runtime (a no-op for a single process)."""
    if cluster is None:
        return
    # CPU processes exchange collectives over gloo (accelerators use their own fabric).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster.coordinator_address is None:
        jax.distributed.initialize()
        return
    jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                               num_processes=cluster.num_processes, process_id=cluster.process_id,
                               local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None)

