"""Scaling laws: sweep designs, fits (Kaplan power laws, Chinchilla Approaches 2 and 3)
with bootstrap intervals, results tables and plots; `python -m lm.fit_scaling` runs the fits."""
