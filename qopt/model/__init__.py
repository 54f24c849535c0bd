"""The OPT network in plain torch: config, layers and heads, KV cache, outputs, tokenizer, NaN/inf tracing."""
