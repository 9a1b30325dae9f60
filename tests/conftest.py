"""Test setup: 8 fake CPU devices for in-process tests and caches shared by the session.

In-process tests see 8 CPU devices and pick the ones they need (`jax.devices()[:1]` for
a single-device reference). Tests that run the CLI in a subprocess get a user's clean
environment (see helpers.cli_env), so the CLI chooses its devices as it would for a user.

XLA compiles without its backend (LLVM) optimisations, in-process and in the CLI runs the
tests start (JAX_DISABLE_MOST_OPTIMIZATIONS, as flax's tests do): the tests' programs are
tiny and run a few steps, so optimising them costs more than it saves (the pipeline and
8-device tests ran in 211 s instead of 326 s). Tests that train for hundreds of steps or
check a TPU program's memory compile as a user's run does: `@pytest.mark.optimized`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # read when jax is imported

import pytest  # noqa: E402

from tests.helpers import random_export  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def shared_caches(tmp_path_factory):
    """One dataset build and one compilation cache for the whole session."""
    root = tmp_path_factory.mktemp("caches")
    os.environ["LM_DATA_DIR"] = str(root / "data")
    os.environ["LM_COMPILATION_CACHE"] = str(root / "xla")
    from lm.parallel import runtime

    runtime.enable_compilation_cache(os.environ["LM_COMPILATION_CACHE"])
    yield


@pytest.fixture(autouse=True)
def optimized_compiles(request, monkeypatch):
    """XLA's optimisations back on, here and in the CLI runs, for a test marked `optimized`."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    import jax

    was_disabled = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "").lower() in ("1", "true", "yes", "on")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", was_disabled)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> str:
    """random_export with a context of 48 tokens."""
    return random_export(str(tmp_path_factory.mktemp("pretrained") / "export"))
