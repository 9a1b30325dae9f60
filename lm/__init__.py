"""`lm`: a JAX/Flax research codebase for language models."""

import glob
import os

__version__ = "0.1.0"


def tpu_chip_present() -> bool:
    """Whether this machine has a TPU chip: /dev/accel*, or a Google PCI device (vendor
    0x1ae0, JAX's own check) other than the gVNIC network card (0x0042) every Compute
    Engine VM has."""
    if glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == "0x1ae0" and g.read().strip() != "0x0042":
                    return True
        except OSError:
            continue
    return False


def _quiet_tpu_runtime_off_tpu() -> None:
    """On a machine with no TPU chip, give libtpu (the `[tpu]` extra: the TPU compiler that
    `--compile_only --topology=v5p-128` uses) the worker name and accelerator type it would
    otherwise look for, so that it prints no warnings when JAX starts its backends, and let
    more than one process load it (it otherwise locks /tmp/libtpu_lockfile).

    Runs at import, before any backend starts. A TPU VM and anything the user set are left
    alone.
    """
    if tpu_chip_present():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # any known type; the compiler takes its own
    # No chip to guard: two compile-only processes (two checks, a test beside a run) may both load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_quiet_tpu_runtime_off_tpu()
