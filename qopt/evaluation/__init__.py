"""Measurement: WikiText-2 perplexity, weight footprint, the precision comparison and the regression gate."""
