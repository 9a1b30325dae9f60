"""Training: the pure steps (step), compiling them (trainer), a run's setup (setup), the loop
(loop), early stops (stopping), the optimizer (optim), memory and AOT checks, and logs."""
