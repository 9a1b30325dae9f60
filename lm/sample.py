r"""Sample text from a trained run.

    python -m lm.sample --workdir=/tmp/shakespeare_char --prompt="ROMEO:" \
        --max_new_tokens=200 --temperature=0.8 --top_k=200

Loads the run's config, tokenizer and latest checkpoint (or `--step`) from the workdir,
or a params-only export (`python -m lm.export`), and prints `--num_samples`
continuations of the prompt, decoded through a KV cache (past the context, the cache is
refilled with its last half: lm.inference.decode.generate_windowed). An encoder-decoder
(T5-style) run reads the prompt as its input and prints its output. With `--beam_size=W`
it prints the `--num_samples` best of W beams and their scores (log-probability over
GNMT's length penalty, `--length_penalty`):

    python -m lm.sample --workdir=/tmp/shakespeare_char --prompt="ROMEO:" \
        --max_new_tokens=40 --beam_size=4 --num_samples=2

Runs on one device of any machine.
"""

from __future__ import annotations

from absl import app, flags

from lm.config import parse_flags
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional
from lm.inference import beam, decode
from lm.parallel import runtime
from lm.runs import artifacts
from lm.training import optim

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/) or an "
                               "export written by lm.export.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint to sample from; default the latest.", lower_bound=0)
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text to continue.")
# Each number has its range: absl refuses one outside it in one line, before the run loads.
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 200, "Sample among the k most likely tokens; 0 keeps all.", lower_bound=0)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "How many samples to print.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (sample i uses seed + i).")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 0, "If > 0, beam search with this many beams instead of "
                                  "sampling; prints the --num_samples best.", lower_bound=0)
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.0, "Beam search: GNMT's length penalty exponent "
                                     "(0 ranks by total log-probability; larger favours longer outputs).")


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    if not _WORKDIR.value:
        exit_with_error("--workdir is required. Fix: --workdir=<a directory written by lm.main>.")
    if _BEAM_SIZE.value and _NUM_SAMPLES.value > _BEAM_SIZE.value:
        exit_with_error(f"--beam_size={_BEAM_SIZE.value} with --num_samples={_NUM_SAMPLES.value}: beam search "
                        "prints between 1 and beam_size beams. Fix: a positive --beam_size (0 samples instead) "
                        "and at most that many --num_samples.")
    runtime.enable_compilation_cache()
    try:
        run = artifacts.load(_WORKDIR.value, _STEP.value, eval_params=optim.eval_params_reader)
    except UsageError as e:
        exit_with_error(str(e))
    if run.model_cfg.family == "encoder":
        exit_with_error(f"{_WORKDIR.value} holds an encoder-only model, which fills in masks rather than writing "
                        "text. Fix: point --workdir at a decoder or encoder_decoder run.")
    try:  # a prompt the tokenizer refuses is the user's to fix, whatever the decoding
        run.tokenizer.encode(_PROMPT.value)
    except ValueError as e:
        exit_with_error(f"--prompt: {e}")
    if _BEAM_SIZE.value:
        print_beams(run)
        return
    for i in range(_NUM_SAMPLES.value):
        try:
            text = decode.sample_text(run.model, run.params, run.tokenizer, _PROMPT.value,
                                      max_new_tokens=_MAX_NEW_TOKENS.value, max_len=run.config.data.seq_len,
                                      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, seed=_SEED.value + i)
        except ValueError as e:
            exit_with_error(str(e))
        print_text(run, f"sample {i + 1}", text)


def print_beams(run: artifacts.Loaded) -> None:
    try:
        beams = beam.beam_texts(run.model, run.params, run.tokenizer, _PROMPT.value, beam_size=_BEAM_SIZE.value,
                                  max_new_tokens=_MAX_NEW_TOKENS.value, length_penalty=_LENGTH_PENALTY.value)
    except ValueError as e:
        exit_with_error(f"{e} (beam search keeps every beam in a KV cache of the model's context)")
    for i, (text, score) in enumerate(beams[:_NUM_SAMPLES.value]):
        print_text(run, f"beam {i + 1} of {_BEAM_SIZE.value}, score {score:.4f}", text)


def print_text(run: artifacts.Loaded, title: str, text: str) -> None:
    if run.model_cfg.family == "encoder_decoder":  # the output is not a continuation
        print(f"--- {title} (checkpoint step {run.step}) ---\ninput: {_PROMPT.value}\noutput: {text}", flush=True)
    else:
        print(f"--- {title} (checkpoint step {run.step}) ---\n{_PROMPT.value}{text}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
