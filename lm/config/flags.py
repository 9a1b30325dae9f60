"""Reading `--config=recipe.py --config.a.b=value` from the command line, with one clear
line for each way it can go wrong: a missing recipe file, a recipe that fails to load, a
field an override names that the config lacks (with the close match ml_collections
suggests), a value of the wrong type.

Every command that takes `--config` runs `app.run(main, flags_parser=parse_flags)`.
"""

from __future__ import annotations

import os
import re

from absl import flags

from lm.errors import exit_with_error

SCHEMA = "lm/config/schema.py"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, then the `--config` file loaded (where it fails); exits with one line."""
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None and not isinstance(config, str):  # lm.sweep's --config is a path
            config.keys()  # a missing or broken config file fails here
    except flags.Error as e:
        exit_with_error(f"{str(e).rstrip('.')}. Fix: see the flags in `{_command(argv)} --help`.")
    except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError, ImportError) as e:
        exit_with_error(load_error(e, argv))
    return rest


def _command(argv: list[str]) -> str:
    """`python -m lm.<name>` from the running module's path (argv[0])."""
    name = os.path.splitext(os.path.basename(argv[0]))[0] if argv else "main"
    return f"python -m lm.{name}"


def load_error(error: Exception, argv: list[str]) -> str:
    """The one-line message for a config that could not be loaded or overridden."""
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):  # ConfigDict wraps a KeyError
        inner = inner.args[0]
    text = str(inner.args[0]) if inner.args else str(inner)
    missing_file = re.search(r"No such file or directory: '([^']+)'", text)
    if isinstance(error, OSError) and missing_file:
        return (f"--config={missing_file.group(1)}: no such file. Fix: give a recipe file, e.g. "
                "--config=configs/shakespeare_char.py (the recipes are in configs/).")
    if isinstance(error, AttributeError | KeyError):
        unknown = re.match(r"'([^']+)'", text)
        if unknown:
            return _unknown_field(unknown.group(1), re.search(r'Did you mean "([^"]+)"', text), argv)
    return (f"could not load the config ({type(error).__name__}: {text.splitlines()[0] if text else ''}). "
            f"Fix: check the --config file and the --config.* overrides (the fields are in {SCHEMA}).")


def _unknown_field(name: str, suggestion: re.Match | None, argv: list[str]) -> str:
    overrides = [a.split("=", 1)[0] for a in argv if re.match(rf"--config(\.\w+)*\.{re.escape(name)}(=|$)", a)]
    where = overrides[0] if overrides else f"a --config.* override naming {name!r}"
    hint = f"did you mean {suggestion.group(1)!r}? The" if suggestion else "the"
    return f"{where}: the config has no field {name!r}. Fix: {hint} fields are listed in {SCHEMA}."
