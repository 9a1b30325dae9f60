"""Test setup: 8 fake CPU devices for in-process tests and caches shared by the session.

In-process tests see 8 CPU devices and pick the ones they need (`jax.devices()[:1]` for
a single-device reference). Tests that run the CLI in a subprocess get a user's clean
environment (see helpers.cli_env), so the CLI chooses its devices as it would for a user.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm import runs  # noqa: E402
from lm.data import corpora, tokenizers  # noqa: E402
from lm.model import ModelConfig, build  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def shared_caches(tmp_path_factory):
    """One dataset build and one compilation cache for the whole session."""
    root = tmp_path_factory.mktemp("caches")
    os.environ["LM_DATA_DIR"] = str(root / "data")
    os.environ["LM_COMPILATION_CACHE"] = str(root / "xla")
    from lm import runtime

    runtime.enable_compilation_cache(os.environ["LM_COMPILATION_CACHE"])
    yield


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> str:
    """A tiny decoder with a character vocabulary, written as an export (random weights
    stand in for pretraining: these tests check mechanics, not accuracy)."""
    config = tiny_config(data__seq_len=48)
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        tokenizer = tokenizers.CharTokenizer.train([f.read()])
    model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size, config.data.seq_len)
    params = nn.meta.unbox(build(model_cfg).init(jax.random.key(0), jnp.zeros((1, 48), jnp.int32))["params"])
    path = str(tmp_path_factory.mktemp("pretrained") / "export")
    runs.write_export(path, jax.tree.map(np.asarray, params), config, tokenizer,
                      {"step": 0, "dtype": "float32", "parameters": 0})
    return path
