"""Test setup: 8 fake CPU devices for in-process tests and caches shared by the session.

In-process tests see 8 CPU devices and pick the ones they need (`jax.devices()[:1]` for
a single-device reference). Tests that run the CLI in a subprocess get a user's clean
environment (see helpers.cli_env), so the CLI chooses its devices as it would for a user.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

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


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> str:
    """random_export with a context of 48 tokens."""
    return random_export(str(tmp_path_factory.mktemp("pretrained") / "export"))
