"""Print who this process would be in a multi-process run (launch scripts' dry runs).

    python -m lm.distributed

Prints the coordinator, process count and id that `lm.main --distributed` would use here:
from `LM_*` or SLURM variables, or else that JAX's own detection (TPU VMs, other
clusters JAX knows) would say at start-up.
"""

from __future__ import annotations

from absl import app

from lm.config import parse_flags
from lm.errors import UsageError, exit_with_error, reject_positional
from lm.parallel import distributed


def main(argv: list[str]) -> None:
    reject_positional(argv)
    try:
        cluster = distributed.resolve(distributed=True)
    except UsageError as e:
        exit_with_error(str(e))
    print(cluster.describe())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
