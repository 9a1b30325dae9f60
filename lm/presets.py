"""Print every named model shape: total and non-embedding parameters, the published count,
training GFLOPs per token (computed abstractly: nothing is allocated).

    python -m lm.presets
"""

from __future__ import annotations

from absl import app

from lm.config import parse_flags
from lm.errors import quiet_logging, reject_positional
from lm.model import presets


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    print(f"{'preset':<12} {'parameters':>14} {'non-embedding':>14} {'published':>10} {'GFLOP/token':>12}")
    for preset in presets.PRESETS:
        d = presets.describe(preset)
        published = presets.PUBLISHED_PARAMETERS.get(preset)
        print(f"{preset:<12} {d['total']:>14,} {d['non_embedding']:>14,} "
              f"{(f'{published / 1e6:,.0f}M' if published else '-'):>10} {d['train_flops_per_token'] / 1e9:>12.3f}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
