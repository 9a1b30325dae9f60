"""Train a language model.

    python -m lm.main --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare

Any config field can be overridden (`--config.train.steps=500`), and a config file may
take an argument (`--config=configs/x.py:small`). Rerunning the same command on the same
workdir resumes from its latest checkpoint. Exit status 2 means the config or the
command line was wrong (the message names the field and the fix); 3 that training
diverged (NaN/Inf); 75 that SIGTERM or SIGINT stopped it after a checkpoint, so the same
command resumes it.

Several processes (hosts of a TPU slice, SLURM tasks) run the same command with
`--distributed` (the environment says who is who) or with explicit
`--coordinator_address --num_processes --process_id` (see lm/parallel/distributed.py).

    python -m lm.main --config=configs/gpt2_small.py --compile_only --topology=cpu:64

compiles the train step for 64 devices (fake CPU ones on a laptop) and prints its
per-device memory, allocating nothing: a pod config checked before it is launched.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lm import config as config_lib
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional
from lm.parallel import distributed, runtime
from lm.training import aot, goodput, loop
from lm.training.stopping import RunStopped

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/shakespeare_char.py (or file.py:arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the config.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "One of several processes: SLURM's variables or JAX's detection (TPU VMs) say which.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit clusters).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (explicit clusters).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0 (explicit clusters).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the train step ahead of time, print its per-device memory, train nothing.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: the devices to compile for: a Cloud TPU slice (v5p-128, v5e-16; the "
    "TPU compiler, from the [tpu] extra) or cpu:N (N fake CPU devices).")
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "With --topology=<TPU slice>: that many slices joined over the data-centre network (DCN).")


def load_config():
    """The validated config; exits with the field and the fix if it cannot run."""
    needed = ("config",) if _COMPILE_ONLY.value else ("config", "workdir")
    for name in needed:
        if not flags.FLAGS[name].value:
            exit_with_error(f"--{name} is required. Fix: e.g. python -m lm.main "
                            "--config=configs/shakespeare_char.py --workdir=/tmp/shakespeare")
    config = _CONFIG.value
    if _WORKDIR.value and "://" in _WORKDIR.value:
        exit_with_error(f"--workdir={_WORKDIR.value} is a URL; lm writes its workdir with file I/O. Fix: mount "
                        "the bucket (e.g. gcsfuse) at the same path on every host and pass that path.")
    try:
        config_lib.validate(config)
    except UsageError as e:
        exit_with_error(str(e))
    return config


def main(argv: list[str]) -> None:
    # The run's goodput counts from the process's start (where /proc cannot say, from here).
    started = goodput.process_start()
    reject_positional(argv)
    quiet_logging()
    config = load_config()
    try:
        cluster = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                      _DISTRIBUTED.value)
        target = aot.target(_TOPOLOGY.value, _COMPILE_ONLY.value, _NUM_SLICES.value)
    except ValueError as e:
        exit_with_error(str(e))
    runtime.setup(config, cpu_devices=target.host_cpu_devices)
    distributed.initialize(cluster)
    try:
        if _COMPILE_ONLY.value:
            aot.compile_and_report(config, target.slices)
        else:
            loop.train_and_evaluate(config, _WORKDIR.value, started)
    except UsageError as e:
        exit_with_error(str(e))
    except RunStopped as e:
        exit_with_error(str(e), e.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
