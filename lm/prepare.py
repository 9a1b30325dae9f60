"""Prepare a config's corpus: build it (read, normalise, filter, deduplicate, split, write
TFDS), fit its tokenizer and store its tokens.

    python -m lm.prepare --config=configs/shakespeare_bpe.py

Prints the cleaning report (documents and characters read, dropped by each rule,
duplicates removed, kept per split) and where the dataset and its report live; then fits
the tokenizer (SentencePiece on a bounded sample of the train documents, cached in the
data cache) and tokenizes each split once with `--workers` processes (a progress line,
and documents, tokens and tokens/s per split), printing where the tokens are. A run of
the same config then starts without tokenizing anything. Training prepares the corpus
the same way on first use; this command does it ahead, and lets you inspect and tune the
cleaning first. A built corpus and its tokens are reused until the files or options
change; `--tokenize=false` builds only.

With `--config.data.build=datatrove` (and `data.split=hash`) the build runs as datatrove
stages in bounded memory (`lm.data.build`), on this machine (`--workers=N`, with a
progress line), on Slurm (`--executor=slurm --slurm_partition=...`; `--dry_run` prints
the sbatch scripts) or on Ray (`--executor=ray [--ray_address=...]`), and so does the
tokenizing (on this machine after a Slurm build: rerun once the jobs are done):

    python -m lm.prepare --config=my_corpus.py --config.data.build=datatrove --workers=16
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from lm.config import parse_flags, validated_config
from lm.data import corpus, text_files
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional
from lm.files import atomic

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose config.data to build.", lock_config=True)
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "slurm", "ray"],
                              "data.build=datatrove: where the stages run.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Tasks run at once, of the datatrove build and of tokenizing "
                                "(local: processes; Slurm: the job array's limit; Ray: tasks in flight); 0 = one "
                                "per core (Slurm: no limit; tokenizing a small corpus: this process).",
                                lower_bound=0)
_TASKS = flags.DEFINE_integer("tasks", 0, "data.build=datatrove: parts the files are read in; 0 = one per "
                              "file (memory per task: one file).", lower_bound=0)
_TOKENIZE = flags.DEFINE_bool("tokenize", True, "Also fit the tokenizer and store each split's tokens.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "--executor=slurm: print the sbatch scripts, submit nothing.")
_SLURM = {
    "partition": flags.DEFINE_string("slurm_partition", "", "Slurm partition (required for --executor=slurm)."),
    "time": flags.DEFINE_string("slurm_time", "24:00:00", "Slurm time limit of each task."),
    "cpus_per_task": flags.DEFINE_integer("slurm_cpus_per_task", 1, "Slurm CPUs per task.", lower_bound=1),
    "mem_per_cpu_gb": flags.DEFINE_integer("slurm_mem_per_cpu_gb", 2, "Slurm memory per CPU, GB.", lower_bound=1),
    "qos": flags.DEFINE_string("slurm_qos", "normal", "Slurm QOS."),
    "venv_path": flags.DEFINE_string("slurm_venv", "", "A virtualenv's activate script each job sources."),
    "env_command": flags.DEFINE_string("slurm_env_command", "", "A shell command each job runs first."),
    "sbatch_args": flags.DEFINE_multi_string("slurm_sbatch_arg", [], "More #SBATCH lines, key=value "
                                             "(e.g. account=my_account); repeatable."),
}
_RAY = {
    "address": flags.DEFINE_string("ray_address", "", "Ray cluster address; '' = the cluster ray.init finds "
                                   "(RAY_ADDRESS, or a local one)."),
    "cpus_per_task": flags.DEFINE_integer("ray_cpus_per_task", 1, "Ray CPUs per task.", lower_bound=1),
    "mem_per_cpu_gb": flags.DEFINE_float("ray_mem_per_cpu_gb", 2.0, "Ray memory per CPU, GB.", lower_bound=0.1),
}


def report_lines(report: dict) -> list[str]:
    row = lambda name, t: f"  {name:<34} {t['documents']:>10,} documents {t['chars']:>14,} chars"
    lines = [row("read", report["read"])]
    lines += [row(f"dropped by {rule}", tally) for rule, tally in report["dropped"].items()]
    lines += [row("exact duplicates removed", report["exact_duplicates"]),
              row("near duplicates removed", report["near_duplicates"])]
    lines += [row(f"kept in {split}", tally) for split, tally in report["splits"].items()]
    return lines


def build_options(config) -> dict:
    """`lm.data.build.run`'s options from the flags; {} for the in-memory build. Raises
    UsageError (one message with the whole fix) for flags the config's build or the
    executor does not take."""
    _refuse_unused_flags(config)
    if config.data.build != "datatrove":
        return {}
    options = {}
    if _EXECUTOR.value == "slurm":
        options = {key: flag.value for key, flag in _SLURM.items()}
        pairs = [arg.split("=", 1) for arg in options["sbatch_args"]]
        if any(len(pair) != 2 for pair in pairs):
            raise UsageError(f"--slurm_sbatch_arg={options['sbatch_args']}: each must be key=value. "
                             "Fix: e.g. --slurm_sbatch_arg=account=my_account.")
        options["sbatch_args"] = dict(pairs)
    elif _EXECUTOR.value == "ray":
        options = {key: flag.value for key, flag in _RAY.items()}
    return dict(executor=_EXECUTOR.value, workers=_WORKERS.value, tasks=_TASKS.value, dry_run=_DRY_RUN.value,
                executor_options=options)


def _refuse_unused_flags(config) -> None:
    """Raises UsageError for flags that would have no effect: executor flags without the
    datatrove build, --tasks with the in-memory build, --slurm_*/--ray_* without their
    executor; and --dry_run's whole fix at once (the build, Slurm, a partition)."""
    datatrove = config.data.build == "datatrove"
    slurm = _DRY_RUN.value or _EXECUTOR.value == "slurm"
    given = [name for name, used in (("--dry_run", _DRY_RUN.value), (f"--executor={_EXECUTOR.value}",
             _EXECUTOR.value != "local"), ("--tasks", _TASKS.present)) if used]
    missing = [fix for fix, needed in (
        ("--config.data.build=datatrove --config.data.split=hash", given and not datatrove),
        ("--executor=slurm", _DRY_RUN.value and _EXECUTOR.value != "slurm"),
        ("--slurm_partition=<partition>", slurm and not _SLURM["partition"].value)) if needed]
    if missing:
        runs = "the datatrove build" + (" on Slurm" if slurm else "") + (" (printing its sbatch scripts)"
                                                                         if _DRY_RUN.value else "")
        raise UsageError(f"{' '.join(given)} {'run' if len(given) > 1 else 'runs'} {runs}. Fix: add "
                         f"{' '.join(missing)}{'' if slurm else ', or drop ' + ' '.join(given)}.")
    for executor, group in (("slurm", _SLURM), ("ray", _RAY)):
        given = [f"--{flag.name}" for flag in group.values() if flags.FLAGS[flag.name].present]
        if given and _EXECUTOR.value != executor:
            raise UsageError(f"{' '.join(given)}: no effect without --executor={executor}. Fix: add "
                             f"--executor={executor}"
                             f"{'' if datatrove else ' --config.data.build=datatrove --config.data.split=hash'}, "
                             f"or drop {' '.join(given)}.")


def tokenize_options(options: dict) -> dict:
    """`lm.data.corpus.prepare`'s tokenizing options from the build's: Ray tokenizes on Ray,
    anything else on this machine."""
    ray = options.get("executor") == "ray"
    return dict(executor="ray" if ray else "local", workers=_WORKERS.value,
                executor_options=options["executor_options"] if ray else {}, verbose=True)


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    config = validated_config(_CONFIG.value, "configs/shakespeare_bpe.py")
    try:
        options = build_options(config)
        built = corpus.builders(config, **options)
    except UsageError as e:
        exit_with_error(str(e))
    if not built and options:
        print("nothing built here: " + ("a dry run" if options["dry_run"] else "the Slurm jobs build it"))
    for name, builder in built.items():
        report = text_files.report(builder)
        print(f"corpus {name}: {len(builder.builder_config.files)} file(s)")
        print("\n".join(report_lines(report)))
        path = os.path.join(builder.data_dir, "cleaning_report.json")
        if not os.path.exists(path):
            atomic.write_json(path, report, indent=2)
        print(f"dataset: {builder.data_dir}\nreport: {path}")
    if _TOKENIZE.value and len(built) == len(corpus.sources(config)) and not options.get("dry_run"):
        try:
            prepared = corpus.prepare(config, None, **tokenize_options(options))
        except UsageError as e:
            exit_with_error(str(e))
        tokenizer = prepared.tokenizer
        print(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size:,} ids")
        for builder in built.values():
            print(f"tokens: {corpus.token_dir(config, builder, tokenizer)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
