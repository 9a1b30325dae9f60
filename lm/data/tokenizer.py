"""`python -m lm.data.tokenizer`, the old path of `python -m lm.tokenizer` (kept for existing scripts)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("lm.tokenizer", run_name="__main__", alter_sys=True)
