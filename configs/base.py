"""The schema of an `lm` run, as recipes import it: `from lm.configs import base`.

Every field, its default and what it means live in the library, `lm/config/schema.py`
(`lm.config.schema.get_config`); this file re-exports them so that recipes and users'
configs keep starting from `base.get_config()` and overriding values.

    python -m lm.main --config=configs/base.py --workdir=/tmp/lm_base

trains a small character model on the embedded Shakespeare corpus (the same run as
`configs/shakespeare_char.py`, whose docstring gives the expected result).
"""

from lm.config.schema import DEFAULT_RULES, get_config

__all__ = ["DEFAULT_RULES", "get_config"]
