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

from lm.errors import UsageError

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
    """One process per SLURM task; with several tasks on a node, each drives the GPU of its local id.

    Raises UsageError naming the variable when one is not a number, a process id is out of
    range, or the node list is missing (the job step's environment was not SLURM's own)."""
    tasks = _env_int(env, "SLURM_NTASKS", "1", minimum=1)
    if "SLURM_JOB_ID" not in env or tasks < 2:
        return None
    port = SLURM_PORT_BASE + _env_int(env, "SLURM_JOB_ID", minimum=0) % 4096
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = expand_hostlist(nodelist)
    except ValueError:  # a range that is not numbers, e.g. gpu[a-b]
        hosts = []
    if not hosts:
        raise UsageError(f"SLURM_NTASKS={tasks} but no node list names a node (SLURM_STEP_NODELIST or "
                         f"SLURM_JOB_NODELIST: {nodelist!r}), so the coordinator is unknown. Fix: start each task "
                         "with srun inside the job (it sets them), or give --coordinator_address --num_processes "
                         "--process_id.")
    per_node = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", "1"))
    if per_node is None:
        raise UsageError(f"SLURM_NTASKS_PER_NODE={env['SLURM_NTASKS_PER_NODE']!r} is not a task count like 8 or "
                         "8(x2). Fix: unset it or let srun set it.")
    local = (_env_int(env, "SLURM_LOCALID", "0", minimum=0),) if int(per_node[0]) > 1 else None
    process_id = _env_int(env, "SLURM_PROCID", "0", minimum=0)
    _check_process_id(process_id, tasks, "SLURM_PROCID", "SLURM_NTASKS")
    return Cluster(f"{hosts[0]}:{port}", tasks, process_id, local, "slurm")


def _env_int(env: Mapping[str, str], name: str, default: str | None = None, minimum: int = 0) -> int:
    """The environment variable `name` as an integer of at least `minimum`; UsageError if
    it is missing (without a `default`) or is not one."""
    text = env.get(name, default)
    if text is None:
        raise UsageError(f"{name} is not set. Fix: set it with the other variables of the cluster, or unset them.")
    try:
        value = int(text or (default or ""))
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UsageError(f"{name}={text!r} is not an integer of at least {minimum}. Fix: set it to one, or unset "
                         "the cluster's variables for a single-process run.")
    return value


def _check_process_id(process_id: int, num_processes: int, id_name: str, count_name: str) -> None:
    if num_processes < 1:
        raise UsageError(f"{count_name}={num_processes}: a run has at least one process. Fix: count them.")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"{id_name}={process_id} is not in [0, {count_name}={num_processes}). "
                         f"Fix: number processes 0 to {num_processes - 1}.")


def _check_address(address: str, name: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{name}={address!r} is not host:port (a port from 1 to 65535). Fix: e.g. "
                         "10.0.0.1:1234, the address of process 0.")


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, distributed: bool = False,
            env: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster this process belongs to, or None for a single-process run.

    Raises UsageError, naming the flag or variable and the fix, for an incomplete or
    inconsistent cluster (a missing setting, a non-number, a process id out of range)."""
    if coordinator_address or num_processes is not None or process_id is not None:
        missing = [name for name, value in (("coordinator_address", coordinator_address),
                                            ("num_processes", num_processes), ("process_id", process_id))
                   if value is None or value == ""]
        if missing:
            raise UsageError(f"--{' --'.join(missing)} missing: an explicit cluster needs all of "
                             "--coordinator_address, --num_processes and --process_id. Fix: give all three, "
                             "or --distributed alone to let the environment (SLURM, TPU VM) say.")
        _check_process_id(process_id, num_processes, "--process_id", "--num_processes")
        _check_address(coordinator_address, "--coordinator_address")
        return Cluster(coordinator_address, num_processes, process_id, None, "flags")
    if env.get("LM_COORDINATOR_ADDRESS"):
        _check_address(env["LM_COORDINATOR_ADDRESS"], "LM_COORDINATOR_ADDRESS")
        count, index = _env_int(env, "LM_NUM_PROCESSES", minimum=1), _env_int(env, "LM_PROCESS_ID")
        _check_process_id(index, count, "LM_PROCESS_ID", "LM_NUM_PROCESSES")
        return Cluster(env["LM_COORDINATOR_ADDRESS"], count, index, None, "environment")
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

