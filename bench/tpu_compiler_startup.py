"""What installing the TPU compiler (libtpu, the `[tpu]` extra) costs a CPU run at start-up.

    .venv/bin/python bench/tpu_compiler_startup.py --runs=10

Starts fresh Python processes that import lm and start JAX's backends as every lm
command does first (lm.parallel.runtime.skip_absent_tpu_backend, then the backends),
alternating between libtpu visible (as installed) and hidden (an
import of `libtpu` fails, so JAX registers no TPU backend), and prints the median
seconds of each, their difference and what each printed on stderr (nothing, on a
machine without a TPU: lm gives libtpu the settings it would otherwise warn about).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

from absl import app, flags

_RUNS = flags.DEFINE_integer("runs", 10, "Processes of each kind, alternated.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = ("import time; t = time.perf_counter(); import jax; from lm.parallel import runtime; "
         "runtime.skip_absent_tpu_backend(); jax.devices(); print(time.perf_counter() - t)")  # as lm's commands start
HIDDEN = "import sys; sys.modules['libtpu'] = None; " + START  # what an uninstalled package looks like to import


def _seconds(code: str) -> tuple[float, str]:
    """(seconds from the first import to started backends, stderr) of one fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS", "XLA_FLAGS"))}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True)
    return float(result.stdout.strip().splitlines()[-1]), result.stderr


def main(argv: list[str]) -> None:
    del argv
    try:
        import libtpu  # noqa: F401
    except ImportError:
        sys.exit("libtpu is not installed, so there is nothing to compare. Fix: pip install -e '.[tpu]'.")
    runs = {"installed": [], "hidden": []}
    stderr = {"installed": set(), "hidden": set()}
    for _ in range(_RUNS.value):
        for kind, code in (("installed", START), ("hidden", HIDDEN)):
            seconds, err = _seconds(code)
            runs[kind].append(seconds)
            stderr[kind].add(err.strip())
    for kind, times in runs.items():
        said = " | ".join(s for s in stderr[kind] if s) or "nothing"
        print(f"libtpu {kind:9}: median {statistics.median(times):.3f} s to start JAX "
              f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} runs); stderr: {said}")
    delta = statistics.median(runs["installed"]) - statistics.median(runs["hidden"])
    print(f"difference: {delta * 1e3:+.0f} ms")


if __name__ == "__main__":
    app.run(main)
