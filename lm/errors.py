"""Usage errors and how every `lm` command reports them: one line and exit status 2.

A `UsageError` is a wrong config value, flag, path or file: its message names the thing
and the fix. Libraries raise a subclass that says where the problem lies (`ConfigError`
in `lm.config`, `CorpusError`, `MeshError`, `WorkdirError`, `RunError`, `ResultsError`);
commands catch `UsageError` and exit with `exit_with_error`. Defines no flags, so any
entry point can import it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags, logging

USAGE_ERROR = 2  # exit status for a wrong config, flag or path; the message says the fix
DIVERGED = 3  # training stopped on NaN/Inf losses or gradients; the checkpoints hold finite states
PREEMPTED = 75  # stopped by SIGTERM/SIGINT after checkpointing (EX_TEMPFAIL): rerun the same command to resume


class UsageError(ValueError):
    """Input that cannot work (a config value, flag, path or file); the message names it and the fix."""


def exit_with_error(message: str, code: int = USAGE_ERROR) -> NoReturn:
    # A preemption's stop is planned, not a failure: "lm: stopped by SIGTERM at step N; ...".
    print(f"lm: {message}" if code == PREEMPTED else f"lm: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def quiet_logging() -> None:
    """Warnings and errors only, unless --verbosity asks for more (0 shows orbax's INFO)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def reject_positional(argv: list[str]) -> None:
    if len(argv) > 1:
        exit_with_error(f"unexpected arguments {argv[1:]}; every option is a --flag.")

