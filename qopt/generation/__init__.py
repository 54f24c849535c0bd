"""Decoding strategies on the preallocated KV cache, text streamers and stop strings, decode fast paths."""
