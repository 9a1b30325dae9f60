"""Interoperability with other ecosystems' checkpoints."""
