"""The streaming loader (checkpoint -> meta model -> quantized, placed model) and model-aware saving."""
