"""Cloud TPU slice names read as chips: the number counts TensorCores on v4 and v5p (two a
chip) and chips on v5e and v6e."""

import pytest

from lm.parallel import topologies
from lm.parallel.topologies import GiB, TopologyError


@pytest.mark.parametrize("name, chips, hbm_gib", [
    ("v4-8", 4, 32), ("v5p-128", 64, 95), ("v5litepod-256", 256, 16), ("v5e-16", 16, 16), ("v6e-64", 64, 32),
])
def test_a_slice_name_gives_its_chips_and_their_memory(name, chips, hbm_gib):
    slices = topologies.parse(name)
    assert slices.chips == chips and slices.chip.hbm_bytes == hbm_gib * GiB


def test_slices_over_the_data_centre_network_multiply_the_chips():
    slices = topologies.parse("v5p-128", num_slices=2)
    assert slices.chips == 128
    assert slices.describe() == "v5p-128 x 2 slices: 128 TPU v5p chips, 95 GiB of HBM each"


@pytest.mark.parametrize("name, num_slices, message", [
    ("v7-8", 1, r"'v7-8' is not a TPU slice name lm knows\. Fix: .*v4, v5p, v5e, v6e, v5litepod"),
    ("tpu", 1, "is not a TPU slice name"),
    ("v5p-3", 1, r"counts TensorCores, two per chip, so 3 is not a slice\. Fix: use a size such as v5p-16"),
    ("v5e-0", 1, "so 0 is not a slice"),
    ("v5p-128", 0, "--num_slices=0 must be at least 1"),
])
def test_a_name_that_is_not_a_slice_is_one_usage_error_with_the_fix(name, num_slices, message):
    with pytest.raises(TopologyError, match=message):
        topologies.parse(name, num_slices)


def test_the_ahead_of_time_check_reads_a_tpu_slice_and_says_what_it_can_check_today():
    from lm.training import aot

    with pytest.raises(TopologyError, match=r"v5p-128 \(v5p-128: 64 TPU v5p chips, 95 GiB of HBM each\).*"
                                            r"Fix: check the mesh on 64 fake CPU devices with --topology=cpu:64"):
        aot.topology_devices("v5p-128", compile_only=True)
    assert aot.topology_devices("cpu:64", compile_only=True) == 64
