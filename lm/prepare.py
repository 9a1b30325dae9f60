"""Build a config's corpus: read, normalise, filter, deduplicate, split, write TFDS.

    python -m lm.prepare --config=configs/shakespeare_bpe.py

Prints the cleaning report (documents and characters read, dropped by each rule,
duplicates removed, kept per split) and where the dataset and its report live. Training
builds the corpus the same way on first use; this command lets you inspect and tune the
cleaning first. A built corpus is reused until its files or options change.
"""

from __future__ import annotations

import os

from absl import app
from ml_collections import config_flags

from lm.config import parse_flags, validated_config
from lm.data import corpus, text_files
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional
from lm.files import atomic

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose config.data to build.", lock_config=True)


def report_lines(report: dict) -> list[str]:
    row = lambda name, t: f"  {name:<34} {t['documents']:>10,} documents {t['chars']:>14,} chars"
    lines = [row("read", report["read"])]
    lines += [row(f"dropped by {rule}", tally) for rule, tally in report["dropped"].items()]
    lines += [row("exact duplicates removed", report["exact_duplicates"]),
              row("near duplicates removed", report["near_duplicates"])]
    lines += [row(f"kept in {split}", tally) for split, tally in report["splits"].items()]
    return lines


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    config = validated_config(_CONFIG.value, "configs/shakespeare_bpe.py")
    try:
        built = corpus.builders(config)
    except UsageError as e:
        exit_with_error(str(e))
    for name, builder in built.items():
        report = text_files.report(builder)
        print(f"corpus {name}: {len(builder.builder_config.files)} file(s)")
        print("\n".join(report_lines(report)))
        path = os.path.join(builder.data_dir, "cleaning_report.json")
        if not os.path.exists(path):
            atomic.write_json(path, report, indent=2)
        print(f"dataset: {builder.data_dir}\nreport: {path}")

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
