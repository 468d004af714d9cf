"""Training data and tokenizer for the small default DeltaNet model (CPU-trainable, shipped in the repo)."""
