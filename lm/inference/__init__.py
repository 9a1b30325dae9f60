"""Serving a trained decoder: the request schema, the continuous-batching engine and the OpenAI-compatible HTTP app."""
