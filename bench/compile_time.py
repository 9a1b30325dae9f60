"""Compile time of the train step against depth, with and without `nn.scan` over layers.

    .venv/bin/python bench/compile_time.py --config=configs/shakespeare_char.py

Lowers and compiles (ahead of time, on abstract inputs: nothing is allocated) the train
step of the config at each depth in --depths, with scan_layers off and on, and prints
the seconds. With scan, a deep model compiles about as fast as a shallow one; the
ratio for the deepest over the shallowest is printed last.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm.config import parse_flags, validated_config  # noqa: E402
from lm.errors import quiet_logging, reject_positional  # noqa: E402
from lm.model import ModelConfig  # noqa: E402
from lm.parallel import (
    runtime,  # noqa: E402
    sharding,  # noqa: E402
)
from lm.training.trainer import make_trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose model to compile.", lock_config=False)
_DEPTHS = flags.DEFINE_list("depths", ["2", "24"], "Numbers of layers to compile.")
_VOCAB = flags.DEFINE_integer("vocab_size", 256, "Vocabulary size (no corpus is read).")


def compile_seconds(config, mesh, layers: int, scan: bool) -> float:
    config.model.num_layers, config.model.scan_layers = layers, scan
    model_cfg = ModelConfig.from_config(config.model, _VOCAB.value, config.data.seq_len)
    trainer = make_trainer(config, model_cfg, mesh, pad_id=0)
    start = time.perf_counter()
    trainer.compile_step(config.train.batch_size, config.data.seq_len)
    return time.perf_counter() - start


def main(argv):
    reject_positional(argv)
    quiet_logging()
    config = validated_config(_CONFIG.value, "configs/shakespeare_char.py")
    runtime.setup(config, compilation_cache=False)
    mesh = sharding.make_mesh(config)
    depths = [int(d) for d in _DEPTHS.value]
    seconds = {}
    for scan in (False, True):
        for layers in depths:
            seconds[scan, layers] = compile_seconds(config, mesh, layers, scan)
            print(f"compile_seconds layers={layers} scan_layers={scan}: {seconds[scan, layers]:.2f}", flush=True)
    for scan in (False, True):
        print(f"ratio_{max(depths)}_over_{min(depths)} scan_layers={scan}: "
              f"{seconds[scan, max(depths)] / seconds[scan, min(depths)]:.2f}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
