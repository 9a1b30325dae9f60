"""Cloud TPU slice names, read as the chips they hold: `v5p-128` is 64 TPU v5p chips.

The number in a name counts TensorCores on v4 and v5p (two per chip) and chips on v5e
and v6e (one core each), as Cloud TPU's accelerator types do (`v4-8`, `v5p-128`,
`v5litepod-256` or `v5e-256`, `v6e-64`). Multi-slice runs join `num_slices` such slices
over the data-centre network. Each chip carries its HBM and its bfloat16 matmul peak from
Google's datasheets, what an ahead-of-time check compares a compiled step against.
"""

from __future__ import annotations

import dataclasses
import re

from lm.errors import UsageError

GiB = 2**30


class TopologyError(UsageError):
    """A TPU slice name or slice count that does not describe a slice; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # "v4", "v5p", "v5e", "v6e"
    hbm_bytes: int  # high-bandwidth memory per chip
    peak_flops: float  # bfloat16 matmul FLOP/s per chip
    cores_per_chip: int  # TensorCores the slice name counts per chip (2 on v4 and v5p, else 1)
    torus_dims: int  # the chips' interconnect: a 3-D torus (v4, v5p) or a 2-D one (v5e, v6e)


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 2, 3),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2, 3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 1, 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1, 2),
}
ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's accelerator type for v5e


@dataclasses.dataclass(frozen=True)
class Slices:
    name: str  # as given, e.g. "v5p-128"
    chip: Chip
    chips_per_slice: int
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        """One slice's chip grid as libtpu names it, e.g. "v5p:4x4x4" for v5p-128."""
        return f"{self.chip.generation}:{'x'.join(map(str, chip_grid(self.chips_per_slice, self.chip.torus_dims)))}"

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (f"{self.name}{slices}: {self.chips} TPU {self.chip.generation} chips, "
                f"{self.chip.hbm_bytes / GiB:.0f} GiB of HBM each")


def parse(name: str, num_slices: int = 1) -> Slices:
    """The slices `name` (a Cloud TPU accelerator type) and `num_slices` describe.

    Raises TopologyError for an unknown generation, a size that is not a positive whole
    number of chips, or a slice count below 1.
    """
    known = ", ".join([*CHIPS, *ALIASES])
    if num_slices < 1:
        raise TopologyError(f"--num_slices={num_slices} must be at least 1. Fix: give the number of slices.")
    name = name.strip()
    if name != name.lower() and re.fullmatch(r"v\d+[a-z]*-\d+", name.lower()):
        raise TopologyError(f"--topology={name!r}: slice names are lower case. Fix: --topology={name.lower()}.")
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    generation = ALIASES.get(match.group(1), match.group(1)) if match else None
    if generation not in CHIPS:
        raise TopologyError(f"--topology={name!r} is not a TPU slice name lm knows. Fix: give a Cloud TPU "
                            f"accelerator type, <generation>-<size> with a generation in {known} (e.g. v5p-128, "
                            "v5e-16), or cpu:N for N fake CPU devices.")
    chip, size = CHIPS[generation], int(match.group(2))
    if size < chip.cores_per_chip or size % chip.cores_per_chip:
        unit = "TensorCores, two per chip" if chip.cores_per_chip == 2 else "chips"
        raise TopologyError(f"--topology={name}: a {generation} slice's size counts {unit}, so {size} is not a "
                            f"slice. Fix: use a size such as {generation}-{8 * chip.cores_per_chip}.")
    return Slices(f"{match.group(1)}-{size}", chip, size // chip.cores_per_chip, num_slices)


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The most nearly cubic (square) grid of `chips`, sides ascending, as Cloud TPU lays
    out its slices: 64 v5p chips are 4x4x4, 128 are 4x4x8, 32 v5e chips 4x8; a 3-D slice
    of one host's 4 chips is 2x2x1."""
    best = min((sides for sides in _factorizations(chips, dims)), key=lambda sides: sides[::-1])
    if dims == 3 and best[0] == 1 and chips > 1:
        return (*best[1:], 1)
    return best


def _factorizations(n: int, dims: int) -> list[tuple[int, ...]]:
    """Every way to write n as `dims` ascending factors."""
    if dims == 1:
        return [(n,)]
    return [(a, *rest) for a in range(1, n + 1) if n % a == 0
            for rest in _factorizations(n // a, dims - 1) if rest[0] >= a]


def compile_devices(slices: Slices) -> list:
    """Compile-only TPU devices for `slices` (libtpu's compiler, no TPU needed): what a mesh
    is built over to compile a step for the pod on any machine, as MaxText's
    train_compile.py does through `jax.experimental.topologies`.

    Raises TopologyError when libtpu (the `[tpu]` extra) is missing or rejects the slice.
    """
    try:
        import libtpu  # noqa: F401  (the TPU compiler; only its presence is checked here)
    except ImportError:
        raise TopologyError(f"--topology={slices.name} compiles with the TPU compiler (libtpu), which is not "
                            "installed. Fix: pip install -e '.[tpu]' (any machine; no TPU needed), or check the "
                            f"mesh on fake CPU devices with --topology=cpu:{slices.chips}.") from None
    from jax.experimental import topologies as jax_topologies

    # One device per chip: v4 and v5p chips join their two TensorCores ("megacore", as
    # MaxText compiles them); a one-chip slice is one host's only chip.
    options = {"chip_config_name": "megacore"} if slices.chip.cores_per_chip == 2 else {}
    if slices.chips_per_slice == 1:
        options["chips_per_host_bounds"] = (1, 1, 1)
    try:
        description = jax_topologies.get_topology_desc(
            platform="tpu", topology_name=slices.topology_name, num_slices=slices.num_slices, **options)
    except Exception as e:  # libtpu's own message says what it rejected
        generation, unit = slices.chip.generation, slices.chip.cores_per_chip
        sizes = ", ".join(f"{generation}-{n * unit}" for n in (1, 4, 8, 16, 32, 64, 128, 256)[unit - 1:])
        raise TopologyError(f"--topology={slices.name}: {slices.chips_per_slice} {generation} chips do not make a "
                            f"slice the TPU compiler can lay out as {slices.topology_name} "
                            f"({str(e).splitlines()[0]}). Fix: use a slice size Cloud TPU offers: {sizes}, ...") \
            from None
    devices = list(description.devices)
    if len(devices) != slices.chips:
        raise TopologyError(f"--topology={slices.name}: the TPU compiler gave {len(devices)} devices for "
                            f"{slices.chips} chips. Fix: report this with the libtpu version; meanwhile check the "
                            f"mesh with --topology=cpu:{slices.chips}.")
    return devices
