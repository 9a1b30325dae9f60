"""The house's shape, as rules a change cannot quietly break.

A module of `lm` fits in a reader's head (at most 400 lines) and a function fits on a
screen (at most 60 lines, from `def` to its last line). The few exceptions are listed
here, each with why it is better whole.
"""

import ast
import pathlib

LM = pathlib.Path(__file__).resolve().parents[1] / "lm"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# "path" or "path:function" -> why it stays longer than the rule. At most five.
ALLOWED = {}


def _modules():
    return sorted(p for p in LM.rglob("*.py") if "configs" not in p.relative_to(LM).parts)


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_the_allowlist_is_short_and_every_entry_says_why():
    assert len(ALLOWED) <= 5
    assert all(len(why) > 20 for why in ALLOWED.values())


def test_no_module_above_400_lines():
    long = {}
    for path in _modules():
        name = str(path.relative_to(LM.parent))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES and name not in ALLOWED:
            long[name] = lines
    assert not long, f"modules above {MAX_MODULE_LINES} lines: {long}; split them by job"


def test_no_function_above_60_lines():
    long = {}
    for path in _modules():
        name = str(path.relative_to(LM.parent))
        for node in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and f"{name}:{node.name}" not in ALLOWED:
                long[f"{name}:{node.name}"] = lines
    assert not long, f"functions above {MAX_FUNCTION_LINES} lines: {long}; split them into named steps"


def test_every_top_level_module_is_a_command():
    """A top-level `lm/X.py` has a main (flags + main); a folder is a library. `errors.py` is
    the exception: every command and library raises its `UsageError`."""
    libraries = []
    for path in sorted(LM.glob("*.py")):
        if path.name in ("__init__.py", "errors.py"):
            continue
        if 'if __name__ == "__main__":' not in path.read_text(encoding="utf-8"):
            libraries.append(path.name)
    assert not libraries, f"top-level modules that are not commands: {libraries}; move them into a package"


def test_setup_cfg_installs_every_package():
    """A package missing from setup.cfg imports in a checkout but not from a wheel."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(LM.parent / "setup.cfg", encoding="utf-8")
    listed = set(parser["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(LM.parent).parts) for p in LM.rglob("__init__.py")
             if "configs" not in p.relative_to(LM).parts}
    assert found <= listed, f"add to setup.cfg's packages: {sorted(found - listed)}"
