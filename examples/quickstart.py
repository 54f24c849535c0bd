"""Load the bundled OPT in full precision and in 4 bits, compare their memory, and continue a prompt with each.

    python examples/quickstart.py

Swap `bundled_model_dir()` for any Hugging Face OPT folder (e.g. a local copy of facebook/opt-1.3b).
"""
import torch

import qopt
from qopt.bundled import bundled_model_dir

torch.manual_seed(0)
path = bundled_model_dir()
tokenizer = qopt.OPTTokenizer.from_pretrained()  # the real OPT tokenizer, shipped with qopt
prompt = "In 1998, the band"

for name, kwargs in (("fp32", {"torch_dtype": torch.float32}),
                     ("nf4", {"quantization": "nf4", "torch_dtype": torch.bfloat16})):
    model = qopt.load(path, progress=False, **kwargs)
    footprint = qopt.weight_footprint(model)
    text, = qopt.generate_text(model, tokenizer, prompt, max_new_tokens=12, repetition_penalty=1.3)
    print(f"{name:>4}: {footprint.bytes / 2**20:5.1f} MiB of weights | {prompt}{text}".replace("\n", " "))
