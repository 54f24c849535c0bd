"""Calibrated quantization: GPTQ rounding decoder layer by decoder layer, sensitivity and mixed precision."""
