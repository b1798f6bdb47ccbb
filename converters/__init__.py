"""PyTorch/HF checkpoints -> Flax parameter trees (and back), one module per source format."""
