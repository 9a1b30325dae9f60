"""Evaluation: metrics for classification, QA and generation, fairness metrics for
classifiers (issue 8; `python -m lm.evaluate` is to come)."""
