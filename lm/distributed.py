"""Print who this process would be in a multi-process run (launch scripts' dry runs).

    python -m lm.distributed

Prints the coordinator, process count and id that `lm.main --distributed` would use here
(from `LM_*` or SLURM variables, or JAX's own detection), or `single process`.
"""

from __future__ import annotations

from lm.parallel import distributed

if __name__ == "__main__":
    found = distributed.resolve(distributed=True)
    print(found.describe() if found else "single process")
