r"""Fine-tune a pretrained model on a task.

    python -m lm.finetune --config=configs/finetune/shakespeare_speakers.py --workdir=runs/speakers \
        --config.init_from=runs/shakespeare_char

Writes to the workdir: the config, `best/` (the trainable parameters at the best
validation score) and `finetune_results.json` (validation and test metrics of that
checkpoint, trainable parameter count, majority baseline). With `config.compare` set it
runs each method in `workdir/<method>` and prints a comparison table. Exit status 2
means the config, a file, the workdir or the pretrained run was wrong; the message says
the fix. A workdir holding a pretraining run, an export or a fine-tuning run with another
config is refused (lm.finetuning.workdir).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lm.config import parse_flags, validate_finetune
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional
from lm.finetuning import loop
from lm.finetuning import workdir as workdir_lib
from lm.parallel import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "A fine-tuning recipe, e.g. "
                                          "configs/finetune/shakespeare_speakers.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the best checkpoint and the results.")


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown: each method's test (or validation) accuracy and trainable parameters."""
    first = next(iter(results.values()))
    split = "test" if first["test"] else "validation"
    lines = [f"| method | {split} accuracy | macro F1 | trainable parameters | best step | seconds |",
             "|---|---|---|---|---|---|"]
    if "majority_baseline" in first:
        lines.append(f"| majority class | {first['majority_baseline']:.3f} | | 0 | | |")
    for method, r in results.items():
        scores = r[split]
        lines.append(f"| {method} | {scores.get('accuracy', float('nan')):.3f} | {scores.get('f1', float('nan')):.3f} "
                     f"| {r['trainable_parameters']:,} | {r['best_step']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    config = _CONFIG.value
    if config is None or not _WORKDIR.value:
        exit_with_error("--config and --workdir are required, e.g. --config=configs/finetune/"
                        "shakespeare_speakers.py --workdir=runs/speakers --config.init_from=runs/shakespeare_char")
    results = {}
    try:
        validate_finetune(config)
        workdirs = workdir_lib.method_workdirs(_WORKDIR.value, config)
        workdir_lib.check_workdirs(_WORKDIR.value, config)  # every method's, before any trains
        runtime.enable_compilation_cache()
        for method, workdir in workdirs.items():
            with config.unlocked():
                config.finetune.method = method
            results[method] = loop.finetune(config, workdir, log=lambda line: print(line, flush=True))
    except UsageError as e:
        exit_with_error(str(e))
    print(comparison_table(results), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
