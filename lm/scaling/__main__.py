"""`python -m lm.scaling fit` still runs `python -m lm.fit_scaling`, its new name (kept for existing scripts)."""

import runpy

if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["fit"]:
        del sys.argv[1]
    runpy.run_module("lm.fit_scaling", run_name="__main__", alter_sys=True)
