"""Write a pre-quantized NF4 checkpoint, then load it with half its decoder layers on disk.

    python examples/offload.py

The same calls place layers over GPUs, CPU and disk on a bigger machine: `max_memory={0: "20GiB", "cpu": "30GiB"}`.
"""
import tempfile
from pathlib import Path

import torch

import qopt
from qopt.bundled import bundled_model_dir

work = Path(tempfile.mkdtemp(prefix="qopt-example-"))
layers, nbytes = qopt.quantize_checkpoint(bundled_model_dir(), work / "nf4", "nf4")
print(f"pre-quantized checkpoint: {layers} NF4 layers, {nbytes / 2**20:.1f} MiB in {work / 'nf4'}")

in_memory = qopt.load(work / "nf4", torch_dtype=torch.bfloat16, progress=False)
layer = sum(t.numel() * t.element_size() for t in in_memory.model.decoder.layers[0].state_dict().values())
budget = qopt.weight_footprint(in_memory).bytes - 3 * layer  # a CPU budget three decoder layers short
offloaded = qopt.load(work / "nf4", torch_dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": budget},
                      offload_folder=work / "offload", progress=False)
on_disk = [name for name, device in offloaded.hf_device_map.items() if device == "disk"]
print(f"CPU budget {budget / 2**20:.1f} MiB: on disk {on_disk}")

ids = qopt.OPTTokenizer.from_pretrained()("Offloaded layers are read back", return_tensors="pt")["input_ids"]
with torch.no_grad():
    same = torch.equal(offloaded(ids).logits, in_memory(ids).logits)
print(f"logits equal to the in-memory model: {same}")
