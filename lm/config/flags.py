"""Reading `--config=recipe.py --config.a.b=value` from the command line, with one clear
line for each way it can go wrong: a missing recipe file, a recipe that fails to load or
rejects its argument (`recipe.py:arg`), a recipe whose get_config() returns None, a field
an override names that the config lacks (with the close match ml_collections suggests), a
value of the wrong type.

Every command that takes `--config` runs `app.run(main, flags_parser=parse_flags)`.
"""

from __future__ import annotations

import os
import re

from absl import flags, logging

from lm.errors import exit_with_error

SCHEMA = "lm/config/schema.py"
FINETUNE_SCHEMA = "configs/finetune/base.py"  # lm.finetune's recipes start from this one
# What ml_collections puts before the traceback of a recipe's get_config() that raised
# ValueError or TypeError (e.g. an argument after ':' the recipe rejects).
_RECIPE_RAISED = "Error whilst parsing config file"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lm/, where the commands are


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, then the `--config` file loaded (where it fails); exits with one line."""
    silence = _ReturnedNone()  # ml_collections warns before the one line below says it
    logging.get_absl_logger().addFilter(silence)
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None and not isinstance(config, str):  # lm.sweep's --config is a path
            config.keys()  # a missing or broken config file fails here
    except flags.Error as e:
        exit_with_error(_flag_error(str(e), argv))
    except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError, ImportError) as e:
        exit_with_error(load_error(e, argv))
    finally:
        logging.get_absl_logger().removeFilter(silence)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present and flags.FLAGS["config"].value is None:
        recipe = flags.FLAGS["config"].config_filename
        exit_with_error(f"--config={recipe}: the recipe's get_config() returned None, not a config. Fix: end "
                        f"get_config() in {recipe.split(':', 1)[0]} with `return config`.")
    return rest


class _ReturnedNone:
    """A logging filter that drops ml_collections' "get_config() returned None" warning."""

    def filter(self, record) -> bool:
        return "returned None" not in record.getMessage()


def _flag_error(text: str, argv: list[str]) -> str:
    """One line for a flag absl refused; a recipe that raised is named with its own message."""
    if _RECIPE_RAISED not in text:
        if "Fix:" in text:  # a validator's message that already says the fix
            return text
        if "invalid literal for int()" in text:  # an integer field given 1.5 or a word
            return f"{text.rstrip('.')}. Fix: give that field a whole number."
        return f"{text.rstrip('.')}. Fix: see the flags in `{_command(argv)} --help`."
    flag, _, trace = text.partition(f": {_RECIPE_RAISED}")
    # The exception's own line: the first one at column 0 after the last traceback header.
    after_header = trace.rsplit("Traceback (most recent call last):", 1)[-1].splitlines()
    raised = next((line for line in after_header if line and not line[0].isspace()), trace.strip())
    recipe = flag.removeprefix("flag ")
    return (f"{recipe}: the recipe raised {raised.rstrip('.')}. Fix: follow the recipe's message, or check "
            f"the argument after ':' against get_config in {recipe.split('=', 1)[-1].split(':', 1)[0]}.")


def _command(argv: list[str]) -> str:
    """`python -m lm.<name>` from the running module's path (argv[0]); `python <argv[0]>` for
    a script outside lm/ (a bench)."""
    if argv and argv[0].endswith(".py") and os.path.dirname(os.path.abspath(argv[0])) != _PACKAGE:
        return f"python {argv[0]}"
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
        recipes = _recipes_dir()
        return (f"--config={missing_file.group(1)}: no such file. Fix: give a recipe file's path from this "
                f"directory ({os.getcwd()}), e.g. --config={recipes}/shakespeare_char.py (the recipes are in "
                f"{recipes}/).")
    if isinstance(error, AttributeError | KeyError):
        unknown = re.match(r"'([^']+)'", text)
        if unknown:
            return _unknown_field(unknown.group(1), re.search(r'Did you mean "([^"]+)"', text), argv)
    return (f"could not load the config ({type(error).__name__}: {text.splitlines()[0] if text else ''}). "
            f"Fix: check the --config file and the --config.* overrides (the fields are in {_schema(argv)}).")


def _recipes_dir() -> str:
    """The repository's configs/, as a path from the current directory when it is below it."""
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    relative = os.path.relpath(recipes)
    return recipes if relative.startswith("..") else relative


def _unknown_field(name: str, suggestion: re.Match | None, argv: list[str]) -> str:
    overrides = [a.split("=", 1)[0] for a in argv if re.match(rf"--config(\.\w+)*\.{re.escape(name)}(=|$)", a)]
    where = overrides[0] if overrides else f"a --config.* override naming {name!r}"
    hint = f"did you mean {suggestion.group(1)!r}? The" if suggestion else "the"
    return f"{where}: the config has no field {name!r}. Fix: {hint} fields are listed in {_schema(argv)}."


def _schema(argv: list[str]) -> str:
    """Where the fields of the running command's config are listed."""
    return FINETUNE_SCHEMA if _command(argv) == "python -m lm.finetune" else SCHEMA
