"""jprune: optimization-first post-training pruning of LLMs in JAX."""

__version__ = "0.1.0"
