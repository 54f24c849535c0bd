"""Files on disk, no model knowledge: HF checkpoint folders (index, shards, headers) and crash-safe publishing."""
