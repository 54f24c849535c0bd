"""bitsandbytes formats and quantizers: the format facts, byte-exact fast quantizers, GPTQ grids, module swaps."""
