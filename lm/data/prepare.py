"""`python -m lm.data.prepare`, the old path of `python -m lm.prepare` (kept for existing scripts)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("lm.prepare", run_name="__main__", alter_sys=True)
