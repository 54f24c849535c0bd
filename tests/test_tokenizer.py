"""The bundled OPT tokenizer against transformers' GPT2Tokenizer on the same files."""
import pytest
import torch

from qopt import OPTTokenizer
from qopt.bundled import wikitext2_test_path


@pytest.fixture(scope="module")
def pair():
    from transformers import GPT2Tokenizer

    from qopt.bundled import bundled_tokenizer_dir

    return OPTTokenizer.from_pretrained(), GPT2Tokenizer.from_pretrained(str(bundled_tokenizer_dir()))


def test_wikitext_ids_identical_to_transformers(pair):
    ours, peer = pair
    lines = wikitext2_test_path().read_text(encoding="utf-8").splitlines(keepends=True)
    sample = [line for line in lines[:400] if line.strip()]
    for text in sample:
        assert ours.encode(text) == peer(text)["input_ids"], text
    joined = "\n\n".join(sample[:60])
    assert ours.encode(joined) == peer(joined)["input_ids"]


def test_special_tokens_and_prefix(pair):
    ours, peer = pair
    assert ours.encode("Hello world") == [2, 31414, 232]
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == (1, 2, 2)
    for text in ("a</s>b", "<pad> x", "  leading spaces", "emoji \U0001F600 and é", ""):
        assert ours.encode(text) == peer(text)["input_ids"], text


def test_batch_padding_sides_and_decode(pair):
    ours, peer = pair
    texts = ["The cat sat.", "A much longer sentence about quantization."]
    left = ours(texts, padding=True, return_tensors="pt", padding_side="left")
    peer.padding_side = "left"
    ref = peer(texts, padding=True, return_tensors="pt")
    assert torch.equal(left["input_ids"], ref["input_ids"])
    assert torch.equal(left["attention_mask"], ref["attention_mask"])
    right = ours(texts, padding=True, return_tensors="pt")
    assert right["input_ids"][0, -1] == ours.pad_token_id and right["attention_mask"][0, -1] == 0
    assert ours.batch_decode(left["input_ids"], skip_special_tokens=True) == texts
    assert ours.decode(ours.encode(texts[1])) == "</s>" + texts[1]


def test_save_and_reload(tmp_path, pair):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    again = OPTTokenizer.from_pretrained(tmp_path)
    assert again.encode("round trip") == ours.encode("round trip")
