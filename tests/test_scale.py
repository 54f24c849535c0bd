"""Scale: an OPT-1.3B-shaped checkpoint streams into NF4 with peak memory near quantized model + one shard."""
import pytest

MARGIN = 0.10  # allowed above (quantized model + largest shard): allocator slack and per-tensor temporaries


@pytest.mark.slow
def test_opt_1_3b_shaped_nf4_load_peak_rss(tmp_path):
    from evals.bench_load import measure, write_synthetic_checkpoint

    folder = write_synthetic_checkpoint(tmp_path / "opt-1.3b", "1.3b")  # 2.6 GB of float16 in <= 500 MB shards
    shards = sorted(folder.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    assert len(shards) >= 5 and largest <= 500 * 10**6
    result = measure("qopt", folder)  # a fresh subprocess: peak = VmHWM - RSS after imports
    quantized = result["model_bytes"]
    assert 0.8e9 < quantized < 1.0e9  # 1.2B linear weights at 4.5 bits + 0.2 GB of bf16 embeddings
    assert result["peak"] <= (1 + MARGIN) * (quantized + largest), (result, largest)
