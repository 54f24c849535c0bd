"""OPTConfig reads and writes HF config.json for real OPT sizes and names the field it rejects."""
import json

import pytest

from qopt import ConfigError, OPTConfig


def test_defaults_match_hf_docs():
    c = OPTConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.ffn_dim, c.max_position_embeddings) == \
        (50272, 768, 12, 3072, 2048)
    assert (c.activation_function, c.pad_token_id, c.bos_token_id, c.eos_token_id) == ("relu", 1, 2, 2)
    assert c.word_embed_proj_dim == 768 and c.do_layer_norm_before and c.enable_bias


def test_round_trip_through_transformers(tmp_path):
    from transformers import OPTConfig as HFConfig

    ours = OPTConfig(hidden_size=1024, num_attention_heads=16, word_embed_proj_dim=512, do_layer_norm_before=False)
    ours.save_pretrained(tmp_path)
    peer = HFConfig.from_pretrained(tmp_path)
    assert (peer.hidden_size, peer.word_embed_proj_dim, peer.do_layer_norm_before) == (1024, 512, False)
    peer.save_pretrained(tmp_path / "peer")
    again = OPTConfig.from_pretrained(tmp_path / "peer")
    for field in ("hidden_size", "word_embed_proj_dim", "do_layer_norm_before", "enable_bias",
                  "layer_norm_elementwise_affine", "_remove_final_layer_norm", "vocab_size"):
        assert getattr(again, field) == getattr(ours, field), field


@pytest.mark.parametrize("bad, field", [
    ({"hidden_size": 100, "num_attention_heads": 12}, "hidden_size"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"activation_function": "swoosh"}, "activation_function"),
    ({"dropout": 2.0}, "dropout"),
    ({"pad_token_id": 999999}, "pad_token_id"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"do_layer_norm_before": "yes"}, "do_layer_norm_before"),
])
def test_bad_fields_are_named(tmp_path, bad, field):
    (tmp_path / "config.json").write_text(json.dumps({**OPTConfig().to_dict(), **bad}))
    with pytest.raises(ConfigError, match=field) as err:
        OPTConfig.from_pretrained(tmp_path)
    assert "config.json" in str(err.value)


def test_unknown_keys_survive_a_round_trip(tmp_path):
    data = {**OPTConfig().to_dict(), "prefix": "</s>", "_name_or_path": "facebook/opt-125m"}
    config = OPTConfig.from_dict(data)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["prefix"] == "</s>" and saved["_name_or_path"] == "facebook/opt-125m"
