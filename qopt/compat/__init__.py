"""What other tools expect of the folders qopt writes: the rules `qopt check` runs (vLLM and transformers for
model folders, PEFT for adapter folders)."""
