"""The house's lint: `ruff check` over the repository passes, with the rule set chosen and
justified in pyproject.toml (pycodestyle, pyflakes, import order, bugbear, pyupgrade)."""

import subprocess
import sys

from tests.helpers import REPO


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
