"""Shared fixtures: tiny random OPT checkpoints written by transformers (the test-only peer) or by qopt."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny test models run fastest single-threaded

TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=64, dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
VARIANTS = {
    "pre_ln": {},
    "post_ln_proj": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
    "no_bias": dict(enable_bias=False),
    "no_ln_affine": dict(layer_norm_elementwise_affine=False),
    "no_final_ln": dict(_remove_final_layer_norm=True, activation_function="gelu"),
}


def hf_config(**overrides):
    from transformers import OPTConfig as HFOPTConfig

    return HFOPTConfig(**{**TINY, **overrides})


def make_hf_model(cls_name: str = "OPTForCausalLM", seed: int = 0, peaky: float = 1.0, **overrides):
    """A random transformers OPT model in eval mode; `peaky` scales the tied embedding to avoid near-ties."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms, so affine parity is tested
        if peaky != 1.0:
            model.get_input_embeddings().weight.mul_(peaky)
    return model


def save_random_opt(folder, peaky: float = 1.0, dtype: torch.dtype | None = None, **overrides):
    """A random qopt OPT written to `folder` (returned): by default OPT's real vocabulary (so text files
    tokenize), hidden 64, 2 layers; `peaky` scales the tied embedding (a head that can express peaked
    distributions), `dtype` is the saved dtype, `overrides` are OPTConfig fields."""
    import qopt

    torch.manual_seed(0)
    config = qopt.OPTConfig(**{**dict(vocab_size=50272, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                      num_attention_heads=4, max_position_embeddings=64, dropout=0.0), **overrides})
    model = qopt.OPTForCausalLM(config)
    model.init_weights()
    if peaky != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(peaky)
    (model.to(dtype) if dtype is not None else model).save_pretrained(folder)
    return folder


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Write a transformers model to a temp folder; returns (folder, hf_model)."""

    def write(cls_name: str = "OPTForCausalLM", **overrides):
        model = make_hf_model(cls_name, **overrides)
        folder = tmp_path / f"hf_{cls_name}"
        model.save_pretrained(folder)
        return folder, model

    return write


@pytest.fixture
def tokenizer_dir():
    from qopt.bundled import bundled_tokenizer_dir

    return bundled_tokenizer_dir()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter for the bundled model whose update is not zero (B initialised at random)."""
    import qopt
    from qopt.bundled import bundled_model_dir

    folder = tmp_path_factory.mktemp("adapter")
    model = qopt.load(bundled_model_dir(), progress=False)
    qopt.add_lora(model, qopt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.2)
    qopt.save_adapter(model, folder)
    return folder
