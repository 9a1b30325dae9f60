"""Train a SentencePiece tokenizer on a config's corpus and report its compression.

    python -m lm.tokenizer train --config=configs/shakespeare_bpe.py --output=/tmp/bpe.model
    python -m lm.tokenizer report --config=configs/shakespeare_bpe.py --model=/tmp/bpe.model

`train` builds the corpus if needed, trains on (a sample of, `max_sentences`) the train
split with `config.data.sentencepiece` (BPE or unigram, vocab size, byte fallback,
user-defined symbols; override any with --config.data.sentencepiece.*), writes the
model file (a new path: train never replaces a file, and checks that before training),
then reports. `report` prints, for the validation split: bytes per token, and whether
decode(encode(text)) gives back the text exactly. Use the model in a recipe
with --config.data.tokenizer=sentencepiece --config.data.sentencepiece.model=PATH.
"""

from __future__ import annotations

import os
import time

from absl import app, flags
from ml_collections import config_flags

from lm import config as config_lib
from lm.config import parse_flags
from lm.data import corpus, tokenizers, vocabulary
from lm.errors import UsageError, exit_with_error, quiet_logging
from lm.files import atomic, paths

COMMANDS = ("train", "report")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose corpus to use.", lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "train: where to write the .model file.")
_MODEL = flags.DEFINE_string("model", None, "report: the .model file to measure.")


def compression(tokenizer: tokenizers.SentencePieceTokenizer, texts: list[str]) -> tuple[float, bool]:
    """(UTF-8 bytes per token, whether every text round-trips exactly)."""
    num_bytes = num_tokens = 0
    exact = True
    for text in texts:
        ids = tokenizer.encode(text)
        num_bytes += len(text.encode("utf-8"))
        num_tokens += len(ids)
        exact &= tokenizer.decode(ids) == text
    return num_bytes / max(num_tokens, 1), exact


def train(config, built: dict, output: str) -> tokenizers.SentencePieceTokenizer:
    start = time.perf_counter()
    tokenizer = vocabulary.train_sentencepiece(config, built)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic.write_bytes(output, tokenizer.model_proto)
    print(f"trained {config.data.sentencepiece.model_type} tokenizer, {tokenizer.vocab_size:,} pieces, in "
          f"{time.perf_counter() - start:.1f} s: {output}")
    return tokenizer


def report(built: dict, tokenizer: tokenizers.SentencePieceTokenizer) -> None:
    validation = [text for builder in built.values() for text in corpus.texts(builder.as_data_source()["validation"])]
    bytes_per_token, exact = compression(tokenizer, validation)
    print(f"validation: {bytes_per_token:.3f} bytes per token over {len(validation):,} documents; "
          f"decode(encode(text)) == text: {'yes' if exact else 'NO'}")


def main(argv: list[str]) -> None:
    quiet_logging()
    if len(argv) != 2 or argv[1] not in COMMANDS:
        exit_with_error(f"give one command, {' or '.join(COMMANDS)}, e.g. python -m lm.tokenizer "
                        "train --config=configs/shakespeare_bpe.py --output=/tmp/bpe.model")
    config = _CONFIG.value
    needed = {"train": _OUTPUT, "report": _MODEL}[argv[1]]
    if config is None or not needed.value:
        exit_with_error(f"{argv[1]} needs --config and --{needed.name}")
    try:
        config_lib.validate(config)
        if argv[1] == "train":
            paths.check_new_file(_OUTPUT.value, "--output")
        else:  # read before the corpus is built: a wrong --model fails at once
            tokenizer = tokenizers.SentencePieceTokenizer.from_file(_MODEL.value)
        built = corpus.builders(config)  # built once, for training and for the report
        if argv[1] == "train":
            tokenizer = train(config, built, _OUTPUT.value)
        report(built, tokenizer)
    except UsageError as e:
        exit_with_error(str(e))
    except (OSError, ValueError) as e:
        exit_with_error(f"{e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
