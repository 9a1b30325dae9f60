"""What every `lm` command-line tool shares: one-line errors and quiet logging.

Defines no flags, so any entry point can import it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags, logging

USAGE_ERROR = 2  # exit status for a wrong config, flag or path; the message says the fix
DIVERGED = 3  # training stopped on NaN/Inf losses or gradients; the checkpoints hold finite states
PREEMPTED = 75  # stopped by SIGTERM/SIGINT after checkpointing (EX_TEMPFAIL): rerun the same command to resume


def exit_with_error(message: str, code: int = USAGE_ERROR) -> NoReturn:
    print(f"lm: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def quiet_logging() -> None:
    """Warnings and errors only, unless --verbosity asks for more (0 shows orbax's INFO)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def reject_positional(argv: list[str]) -> None:
    if len(argv) > 1:
        exit_with_error(f"unexpected arguments {argv[1:]}; every option is a --flag.")


def validated_config(config, example: str):
    """The --config value, validated; exits with one message if missing or wrong.

    `example` completes "--config is required, e.g. --config=...".
    """
    from lm import config as config_lib  # imported late: lm.config pulls in the data modules

    if config is None:
        exit_with_error(f"--config is required, e.g. --config={example}")
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        exit_with_error(str(e))
    return config
