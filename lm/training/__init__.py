"""Training: the pure steps, compiling them, the loop, the optimizer, memory and AOT checks."""
