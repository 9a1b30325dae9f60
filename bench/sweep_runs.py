"""What benchmarks built on `lm.sweep` share: run (or resume) a sweep and read its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sweep(config_arg: str, directory: str, parallel: int = 1) -> list[dict]:
    """Runs `python -m lm.sweep --config=<config_arg> --workdir=<directory>` (a rerun
    resumes: finished points are not trained again) and returns results.jsonl's rows.
    Exits naming the points' logs if the sweep fails."""
    command = [sys.executable, "-m", "lm.sweep", f"--config={config_arg}", f"--workdir={directory}",
               f"--parallel={parallel}"]
    print("+", " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO).returncode:
        sys.exit(f"the sweep {config_arg} failed; its points' logs are {directory}/points/*/sweep.log. "
                 "Rerun to resume.")
    with open(os.path.join(directory, "results.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def define_flags(workdir_help: str) -> None:
    """The flags every sweep bench has: --workdir (required) and --parallel."""
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_integer("parallel", 1, "lm.sweep --parallel: points trained at once.", lower_bound=1)


def run(main: Callable[[list[str]], None]) -> None:
    """absl's app.run with lm's flag parser: a bad or missing flag is one line, exit 2."""
    sys.path.insert(0, REPO)
    from lm.config import parse_flags

    app.run(main, flags_parser=parse_flags)
