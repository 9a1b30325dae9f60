"""Int8 weight-only quantization: the accuracy it costs and the memory it saves.

    python bench/quantize.py --workdir=runs/shakespeare_char

Prints the validation perplexity of the float32 parameters and of their int8
quantization (lm.inference.quantize), the relative change, and the bytes of each.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from lm.config import parse_flags
from lm.errors import quiet_logging
from lm.evaluation import scoring
from lm.inference import quantize
from lm.parallel import runtime
from lm.runs import artifacts
from lm.training import optim

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (or an export).", required=True)
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 0, "Score at most this many windows; 0 = the whole split.")


def main(argv: list[str]) -> None:
    del argv
    quiet_logging()
    runtime.enable_compilation_cache()
    loaded = artifacts.load(_WORKDIR.value, eval_params=optim.eval_params_reader)
    tokens, num_bytes = scoring.corpus_split(loaded, _WORKDIR.value, "validation")
    float32 = scoring.perplexity(loaded, tokens, num_bytes, max_windows=_MAX_WINDOWS.value)
    quantized = quantize.quantize(loaded.params)
    bytes_float32, bytes_int8 = quantize.nbytes(loaded.params), quantize.nbytes(quantized)
    int8 = scoring.perplexity(dataclasses.replace(loaded, params=quantize.dequantize(quantized)), tokens, num_bytes,
                              max_windows=_MAX_WINDOWS.value)
    print(f"validation tokens scored: {int8['tokens']:,}")
    print(f"float32: perplexity {float32['perplexity']:.4f}, {bytes_float32:,} bytes")
    print(f"int8:    perplexity {int8['perplexity']:.4f}, {bytes_int8:,} bytes")
    print(f"perplexity change: {100 * (int8['perplexity'] / float32['perplexity'] - 1):+.3f}%")
    print(f"weights smaller by: {bytes_float32 / bytes_int8:.2f}x")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
