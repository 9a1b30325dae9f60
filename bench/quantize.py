"""Int8 weight-only quantization: the accuracy it costs and the memory it saves.

    python bench/quantize.py --workdir=runs/shakespeare_char

Prints the validation perplexity of the float32 parameters and of their int8
quantization (lm.quantize), the relative change, and the bytes of each.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from lm import quantize, runs, runtime
from lm.data import pipeline
from lm.evaluation import scoring

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (or an export).", required=True)
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 0, "Score at most this many windows; 0 = the whole split.")


def main(argv: list[str]) -> None:
    del argv
    runtime.enable_compilation_cache()
    loaded = runs.load(_WORKDIR.value)
    corpus = pipeline.prepare(loaded.config, os.path.join(_WORKDIR.value, "tokenizer.json"))
    tokens = np.asarray(corpus.tokens["validation"])
    num_bytes = int(round(corpus.bytes_per_token["validation"] * len(tokens)))
    float32 = scoring.perplexity(loaded, tokens, num_bytes, max_windows=_MAX_WINDOWS.value)
    quantized = quantize.quantize(loaded.params)
    loaded.params = quantize.dequantize(quantized)
    int8 = scoring.perplexity(loaded, tokens, num_bytes, max_windows=_MAX_WINDOWS.value)
    bytes_float32, bytes_int8 = quantize.nbytes(runs.load(_WORKDIR.value).params), quantize.nbytes(quantized)
    print(f"validation tokens scored: {int8['tokens']:,}")
    print(f"float32: perplexity {float32['perplexity']:.4f}, {bytes_float32:,} bytes")
    print(f"int8:    perplexity {int8['perplexity']:.4f}, {bytes_int8:,} bytes")
    print(f"perplexity change: {100 * (int8['perplexity'] / float32['perplexity'] - 1):+.3f}%")
    print(f"weights smaller by: {bytes_float32 / bytes_int8:.2f}x")


if __name__ == "__main__":
    app.run(main)
