"""Checkpoints: transformers' files load here, ours load in transformers; sharding, .bin, key layouts."""
import json

import pytest
import torch

import qopt
from qopt.io.checkpoint import inspect_checkpoint, load_state_dict
from tests.conftest import VARIANTS, make_hf_model


def test_hf_written_checkpoint_loads_with_dtypes(hf_checkpoint):
    folder, hf = hf_checkpoint(**VARIANTS["post_ln_proj"])
    ids = torch.randint(3, 1000, (1, 6))
    with torch.no_grad():
        ref = hf(ids).logits
        for dtype, tol in ((None, 1e-4), ("float32", 1e-4), (torch.bfloat16, 0.1), ("auto", 1e-4)):
            model = qopt.OPTForCausalLM.from_pretrained(folder, torch_dtype=dtype)
            assert (model(ids).logits.float() - ref).abs().max() < tol, dtype
    assert qopt.OPTForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_our_checkpoint_loads_in_transformers(tmp_path, hf_checkpoint, shard):
    from transformers import OPTForCausalLM as HF

    folder, _ = hf_checkpoint(**VARIANTS["no_bias"])
    ours = qopt.OPTForCausalLM.from_pretrained(folder)
    out = tmp_path / "ours"
    ours.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    files = inspect_checkpoint(out)
    assert (len(files.shards) > 1) == bool(shard)
    assert "lm_head.weight" not in files.tensors  # tied, as transformers writes it
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in files.tensors
    assert json.loads((out / "config.json").read_text())["enable_bias"] is False
    peer = HF.from_pretrained(out).eval()
    ids = torch.randint(3, 1000, (2, 7))
    with torch.no_grad():
        assert (peer(ids).logits - ours(ids).logits).abs().max() < 1e-5
    again = qopt.OPTForCausalLM.from_pretrained(out)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_sharded_hf_checkpoint_and_legacy_bin(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    if _can_save_bin():
        hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    else:
        _save_bin(hf, tmp_path / "bin")
    ids = torch.randint(3, 1000, (1, 5))
    with torch.no_grad():
        ref = hf(ids).logits
        for sub in ("sharded", "bin"):
            model = qopt.OPTForCausalLM.from_pretrained(tmp_path / sub)
            assert (model(ids).logits - ref).abs().max() < 1e-5, sub


def _can_save_bin() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _save_bin(hf, folder):
    folder.mkdir()
    hf.config.save_pretrained(folder)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")


def test_fairseq_era_keys_without_model_prefix_and_task_heads(tmp_path):
    """facebook/opt-* .bin files name tensors `decoder.*`; task heads start from such a checkpoint."""
    hf = make_hf_model()
    folder = tmp_path / "old"
    folder.mkdir()
    hf.config.save_pretrained(folder)
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    ids = torch.randint(3, 1000, (1, 5))
    with torch.no_grad():
        assert (qopt.OPTForCausalLM.from_pretrained(folder)(ids).logits - hf(ids).logits).abs().max() < 1e-5
        base = qopt.OPTModel.from_pretrained(folder)
        assert (base(ids).last_hidden_state - hf.model(ids).last_hidden_state).abs().max() < 1e-5
    cls = qopt.OPTForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert cls.score.weight.shape == (3, 64) and torch.isfinite(cls.score.weight).all()


def test_load_state_dict_reads_every_tensor(hf_checkpoint):
    folder, hf = hf_checkpoint()
    state = load_state_dict(folder)
    assert set(state) == {k for k in hf.state_dict() if k != "lm_head.weight"}
