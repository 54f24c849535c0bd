"""QLoRA: train a LoRA adapter on the 4-bit bundled model, save it in PEFT's format, load it back.

    python examples/qlora.py [STEPS]

The data is the calibration sample that ships with qopt (WikiText-2 train excerpts and public-domain prose).
"""
import sys
import tempfile
from pathlib import Path

import qopt
from qopt.bundled import bundled_model_dir, data_dir

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
out = Path(tempfile.mkdtemp(prefix="qopt-example-")) / "adapter"
result = qopt.finetune(bundled_model_dir(), data_dir() / "calibration" / "calibration_sample.txt",
                       qopt.TrainingArguments(str(out), max_steps=steps, batch_size=4, learning_rate=1e-3,
                                              eval_batches=4, progress=False),
                       qopt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                       quantization="nf4", block_size=128)
first, last = result.evals[0]["loss"], result.evals[-1]["loss"]
print(f"{result.steps} steps, {result.trainable_parameters:,} trainable parameters: "
      f"eval loss {first:.3f} -> {last:.3f}")

model = qopt.load(bundled_model_dir(), quantization="nf4", progress=False)
qopt.load_adapter(model, out)
text, = qopt.generate_text(model, qopt.OPTTokenizer.from_pretrained(), "The river", max_new_tokens=12,
                           repetition_penalty=1.3)
print(f"with the adapter: The river{text}".replace("\n", " "))
