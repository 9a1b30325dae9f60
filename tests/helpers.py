"""Shared test helpers: tiny configs and running the CLI as a user would."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.configs import shakespeare_char
from lm.data import corpora, tokenizers
from lm.model import ModelConfig, build
from lm.runs import artifacts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "model.num_layers": 2, "model.num_heads": 2, "model.d_model": 32, "data.seq_len": 16,
    "train.batch_size": 8, "train.steps": 6, "train.log_every": 2, "train.eval_every": 0,
    "train.checkpoint_every": 0, "optim.warmup_steps": 2, "eval.batch_size": 8, "eval.num_batches": 2,
    "sample.max_new_tokens": 16,
}


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The Shakespeare recipe shrunk to compile and train in seconds.

    Overrides use dotted names with `__` for the dot: tiny_config(train__steps=3).
    """
    config = shakespeare_char.get_config()
    settings = dict(TINY, **{k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in settings.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return config


def cli_flags(**overrides) -> list[str]:
    """`--config.x.y=v` flags for the tiny config (plus overrides) on the command line."""
    settings = dict(TINY, **{k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--config.{key}={value}" for key, value in settings.items()]


def cli_env() -> dict:
    """A user's shell environment: no fake-device flag, but the session's caches."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def run_cli(module: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python -m module args...` from the repository root, as the README does."""
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr}")
    return result


def free_port() -> int:
    """A loopback port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, log_level: str = "warning"):
    """An ASGI app (lm.serve's make_app) under uvicorn in this process, on a free loopback
    port; yields its base URL once it listens, and stops it afterwards."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def start_server(workdir: str, *flags: str, api_key: str = "test-key"):
    """`python -m lm.serve` on a free loopback port, as a user starts it; yields its base
    URL once /health answers, and stops it afterwards."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lm.serve", f"--workdir={workdir}", f"--port={port}",
                                "--model_name=tiny", f"--api_key={api_key}", *flags],
                               cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    raise AssertionError(process.stdout.read()) from None
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def random_export(path: str, seq_len: int = 48) -> str:
    """A tiny decoder with a character vocabulary and a context of `seq_len`, written as
    an export at `path` (random weights stand in for pretraining: tests that use it check
    mechanics, not accuracy)."""
    config = tiny_config(data__seq_len=seq_len)
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        tokenizer = tokenizers.CharTokenizer.train([f.read()])
    model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size, config.data.seq_len)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.meta.unbox(build(model_cfg).init(jax.random.key(0), tokens)["params"])
    artifacts.write_export(path, jax.tree.map(np.asarray, params), config, tokenizer,
                      {"step": 0, "dtype": "float32", "parameters": 0})
    return path
