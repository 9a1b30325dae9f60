"""Process setup that must happen before JAX starts its backends.

Call `setup(config)` first thing in an entry point (before any JAX operation).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import ml_collections
from absl import logging

import lm

FORCED_DEVICES_FLAG = "xla_force_host_platform_device_count"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_device_count(config: ml_collections.ConfigDict, cores: int | None = None) -> int:
    """How many XLA CPU devices to split this host into.

    An explicit `mesh.cpu_devices` wins; a mesh with no -1 axis needs exactly the product
    of its sizes; otherwise one device per core, lowered until it divides the train and
    eval batch sizes (each device then runs a slice of the batch on its own core).
    """
    if config.mesh.cpu_devices:
        return config.mesh.cpu_devices
    sizes = list(config.mesh.shape.values())
    if -1 not in sizes:
        return math.prod(sizes)
    fixed = math.prod(s for s in sizes if s != -1)
    for n in range(max((cores or available_cores()) // fixed, 1), 0, -1):
        batch_shards = math.prod(n if size == -1 else size
                                 for axis, size in config.mesh.shape.items() if axis in ("data", "fsdp"))
        if config.train.batch_size % batch_shards == 0 and config.eval.batch_size % batch_shards == 0:
            return n * fixed
    return fixed


def setup(config: ml_collections.ConfigDict, compilation_cache: bool = True, cpu_devices: int = 0) -> None:
    """Sets the CPU device count (`cpu_devices`, else from the config) and the persistent
    compilation cache."""
    skip_absent_tpu_backend()
    if compilation_cache:
        enable_compilation_cache()
    if cpu_devices:
        jax.config.update("jax_platforms", "cpu")  # an ahead-of-time check on fake devices
        jax.config.update("jax_num_cpu_devices", cpu_devices)
        return
    if FORCED_DEVICES_FLAG in os.environ.get("XLA_FLAGS", ""):
        return  # the caller (tests, a launch script) fixed the device count itself
    count = cpu_device_count(config)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        logging.warning("JAX backends already started; keeping %d devices (wanted %d CPU devices).",
                        jax.device_count(), count)


def skip_absent_tpu_backend() -> None:
    """On a machine without a TPU chip, keeps JAX from loading libtpu (the `[tpu]` extra)
    to look for one when its backends start: about 70 ms at every start otherwise
    (bench/tpu_compiler_startup.py). JAX does the same for CUDA without an NVIDIA device.
    The TPU platform stays registered (Pallas TPU kernels lower for it) and the TPU
    compiler of `--topology=v5p-128` loads libtpu on its own. The registration table is
    JAX's private one: should it move, JAX just looks for a TPU as before."""
    from jax._src import xla_bridge

    factories = getattr(xla_bridge, "_backend_factories", None)
    registration = factories.get("tpu") if isinstance(factories, dict) else None
    if (registration is None or not getattr(registration, "fail_quietly", False)
            or xla_bridge.backends_are_initialized() or lm.tpu_chip_present()):
        return
    factories["tpu"] = dataclasses.replace(registration, factory=_no_tpu_chip)


def _no_tpu_chip():
    raise RuntimeError("no TPU chip on this machine (lm.tpu_chip_present)")


def enable_compilation_cache(path: str | None = None) -> None:
    """Persistent XLA cache: a repeated run or test skips recompiling its step. (Called
    first by every command, so it also skips the absent TPU backend.)"""
    skip_absent_tpu_backend()
    path = path or os.environ.get("LM_COMPILATION_CACHE",
                                  os.path.join(os.path.expanduser("~"), ".cache", "lm", "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
