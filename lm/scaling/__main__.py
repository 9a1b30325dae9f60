"""`python -m lm.fit_scaling`, the old spelling of `python -m lm.fit_scaling` (kept for existing scripts)."""

import runpy

if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["fit"]:
        del sys.argv[1]
    runpy.run_module("lm.fit_scaling", run_name="__main__", alter_sys=True)
