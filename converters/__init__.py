"""jprune.converters: Hugging Face checkpoints <-> jprune's Flax NNX models."""
