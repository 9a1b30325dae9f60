"""What code wrote a checkpoint: the package version, the git commit and the libraries."""

from __future__ import annotations

import functools
import os
import subprocess

import flax
import jax
import orbax.checkpoint as ocp

import lm

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(lm.__file__)))


@functools.cache
def code_version() -> dict[str, str | bool | None]:
    """{"lm", "git_commit", "git_dirty", "jax", "flax", "orbax"}; the git fields are None
    when the package is not installed from a git checkout (or git is missing)."""
    commit, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    return {"lm": lm.__version__, "git_commit": commit, "git_dirty": None if dirty is None else bool(dirty),
            "jax": jax.__version__, "flax": flax.__version__, "orbax": ocp.__version__}


def describe(version: dict) -> str:
    """"0.1.0, git 1a2b3c4d (modified)" for logs."""
    text = version["lm"]
    if version.get("git_commit"):
        text += f", git {version['git_commit'][:8]}" + (" (modified)" if version.get("git_dirty") else "")
    return text


def _git(*args: str) -> str | None:
    if not os.path.exists(os.path.join(_REPO, "setup.cfg")):  # installed as a package, not run from the repo
        return None
    try:
        result = subprocess.run(["git", "-C", _REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
