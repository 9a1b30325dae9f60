"""The house's import contracts: `lint-imports` over lm's import graph (function-local
imports included) keeps every contract in pyproject.toml's [tool.importlinter]: no import
cycle inside a package, commands above libraries and training above what a run is, and
the model, objectives and data never importing training or inference."""

import os
import subprocess
import sys

from tests.helpers import REPO

LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")  # the console script of the test extra


def lint_imports() -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_import_contract_is_kept():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
