"""The peak FLOP/s that MFU divides by: `train.peak_flops_per_device` if set, else the
chip's datasheet figure (`lm.model.counting.peak_flops`), else, on CPU, a matmul peak
measured once on this host's devices and cached (no datasheet speaks for a CPU)."""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm.files import atomic
from lm.model.counting import peak_flops
from lm.parallel import runtime

CONFIGURED = "train.peak_flops_per_device"
DATASHEET = "the chip's datasheet bf16 peak"
MEASURED_CPU = "a measured CPU matmul peak"
CACHE_NAME = "cpu_matmul_peak.json"


def peak_flops_per_device(configured: float = 0.0, cache_dir: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from: `CONFIGURED`, `DATASHEET`,
    `MEASURED_CPU`, or "" with 0.0 when it is unknown: an accelerator not in the table)."""
    if configured:
        return configured, CONFIGURED
    device = jax.local_devices()[0]
    datasheet = peak_flops(device.device_kind)
    if datasheet:
        return datasheet, DATASHEET
    if device.platform != "cpu":
        return 0.0, ""
    return cached_cpu_peak(cache_dir), MEASURED_CPU


def cached_cpu_peak(cache_dir: str | None = None) -> float:
    """`measure_cpu_peak()` per device, read from `cache_dir`/cpu_matmul_peak.json (default
    ~/.cache/lm) when this host (processor, device count, jax version) was measured before.
    A cache that cannot be read or written is measured around, never an error."""
    directory = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lm")
    path = os.path.join(directory, CACHE_NAME)
    key = (f"{_processor()} | {runtime.available_cores()} cores | {len(jax.local_devices())} devices | "
           f"jax {jax.__version__}")
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict) or not isinstance(cache.get(key), float):
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = measure_cpu_peak()
        try:
            os.makedirs(directory, exist_ok=True)
            atomic.write_json(path, cache, indent=2)
        except OSError:
            pass  # a read-only home: measured again next time
    return cache[key]


def measure_cpu_peak(size: int = 512, repeats: int = 8) -> float:
    """FLOP/s per device of `size`² matmuls run on every local device at once (each device
    its own, as the train step's data-parallel shards run): the fastest of `repeats`, in
    float32 and in bfloat16 (float32 accumulation), whichever is faster. A peak, so a
    burst of load from other processes lowers it less than a mean would. About 0.3 s."""
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    spec = NamedSharding(mesh, P("devices"))
    best = 0.0
    for dtype in (jnp.float32, jnp.bfloat16):
        x_DNN = jax.device_put(jnp.ones((len(devices), size, size), dtype), spec)
        matmul = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x, preferred_element_type=jnp.float32),
                         out_shardings=spec)
        matmul(x_DNN).block_until_ready()  # compile
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(x_DNN).block_until_ready()
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
