"""LoRA / QLoRA: adapter layers, PEFT-format files, data files, the training loop and the finetune recipe."""
