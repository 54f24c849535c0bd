"""qopt's OPT against transformers' on random weights: logits, states, attentions, cache, padding, heads."""
import pytest
import torch

import qopt
from tests.conftest import VARIANTS

ATOL = 1e-4


def load_pair(hf_checkpoint, cls_name="OPTForCausalLM", **overrides):
    folder, hf = hf_checkpoint(cls_name, **overrides)
    ours = getattr(qopt, cls_name).from_pretrained(folder)
    return ours, hf


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_lm_logits_states_attentions_loss(hf_checkpoint, variant):
    ours, hf = load_pair(hf_checkpoint, attn_implementation="eager", **VARIANTS[variant])
    ids = torch.randint(3, 1000, (2, 12))
    with torch.no_grad():
        a = ours(ids, labels=ids, output_hidden_states=True, output_attentions=True)
        b = hf(ids, labels=ids, output_hidden_states=True, output_attentions=True)
    assert max_diff(a.logits, b.logits) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < ATOL
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert max_diff(x, y) < ATOL
    for x, y in zip(a.attentions, b.attentions, strict=True):
        assert max_diff(x, y) < ATOL
    # the SDPA path (no attentions requested) gives the same logits
    with torch.no_grad():
        assert max_diff(ours(ids).logits, b.logits) < ATOL


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_incremental_decoding_matches_full_forward_and_peer(hf_checkpoint, variant):
    ours, hf = load_pair(hf_checkpoint, **VARIANTS[variant])
    ids = torch.randint(3, 1000, (2, 10))
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(6, 10):
            out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        assert cache.get_seq_length() == 10
        assert max_diff(torch.cat(steps, 1), full) < ATOL
        hf_out = hf(ids[:, :6], use_cache=True)
        hf_step = hf(ids[:, 6:7], past_key_values=hf_out.past_key_values, use_cache=True).logits
    assert max_diff(steps[1], hf_step) < ATOL


def test_left_padded_batch_matches_unpadded_and_peer(hf_checkpoint):
    ours, hf = load_pair(hf_checkpoint)
    short, long = torch.randint(3, 1000, (1, 5)), torch.randint(3, 1000, (1, 9))
    ids = torch.cat([torch.cat([torch.ones(1, 4, dtype=torch.long), short], 1), long])
    mask = (ids != 1).long()
    mask[1] = 1
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask).logits
        alone = ours(short).logits
        peer = hf(ids, attention_mask=mask).logits
    assert max_diff(batch[0, 4:], alone[0]) < ATOL
    assert max_diff(batch[0, 4:], peer[0, 4:]) < ATOL
    assert max_diff(batch[1], peer[1]) < ATOL


def test_right_padding_and_inputs_embeds(hf_checkpoint):
    ours, hf = load_pair(hf_checkpoint)
    ids = torch.randint(3, 1000, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask).logits
        embeds = ours.get_input_embeddings()(ids)
        c = ours(inputs_embeds=embeds, attention_mask=mask).logits
    assert max_diff(a[0, :5], b[0, :5]) < ATOL and max_diff(a[1], b[1]) < ATOL
    assert max_diff(a, c) < ATOL


def test_half_precision_padded_batch_has_no_nan(hf_checkpoint):
    ours, _ = load_pair(hf_checkpoint)
    ids = torch.randint(3, 1000, (2, 8))
    ids[0, :3] = 1
    mask = (ids != 1).long()
    for dtype in (torch.bfloat16, torch.float16):
        model = ours.to(dtype)
        with torch.no_grad():
            for attn in (False, True):
                logits = model(ids, attention_mask=mask, output_attentions=attn).logits
                assert torch.isfinite(logits).all(), (dtype, attn)


def test_head_mask_removes_the_heads_contribution(hf_checkpoint):
    """transformers 5 dropped head_mask, so test it by definition: a masked head contributes nothing."""
    ours, _ = load_pair(hf_checkpoint)
    ids = torch.randint(3, 1000, (1, 7))
    heads, dim = ours.config.num_attention_heads, ours.config.head_dim
    head_mask = torch.ones(ours.config.num_hidden_layers, heads)
    head_mask[0, 1] = 0
    attn = ours.model.decoder.layers[0].self_attn
    with torch.no_grad():
        masked = ours(ids, head_mask=head_mask, output_attentions=True)
        assert masked.attentions[0][:, 1].abs().max() == 0
        # zeroing that head's slice of the value projection must give the same result
        attn.v_proj.weight[dim:2 * dim] = 0
        attn.v_proj.bias[dim:2 * dim] = 0
        zeroed = ours(ids)
    assert max_diff(masked.logits, zeroed.logits) < ATOL
    with torch.no_grad():
        assert max_diff(ours(ids, head_mask=torch.ones(heads)).logits, zeroed.logits) < ATOL


def test_return_dict_false_gives_tuples(hf_checkpoint):
    ours, _ = load_pair(hf_checkpoint)
    ids = torch.randint(3, 1000, (1, 4))
    out = ours(ids, labels=ids, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and out[0].dim() == 0 and out[1].shape == (1, 4, 1000)
    base = qopt.OPTModel(ours.config)
    assert base(ids, return_dict=False)[0].shape == (1, 4, 64)


@pytest.mark.parametrize("labels", ["single", "multi", "regression"])
def test_sequence_classification(hf_checkpoint, labels):
    num = 1 if labels == "regression" else 3
    problem = {"single": None, "multi": "multi_label_classification", "regression": None}[labels]
    ours, hf = load_pair(hf_checkpoint, "OPTForSequenceClassification", num_labels=num, problem_type=problem)
    ids = torch.randint(3, 1000, (3, 9))
    ids[0, :3] = 1   # left padding
    ids[1, 6:] = 1   # right padding
    target = {"single": torch.tensor([0, 2, 1]), "multi": torch.tensor([[1., 0, 1], [0, 1, 0], [1, 1, 0]]),
              "regression": torch.tensor([0.5, -1.0, 2.0])}[labels]
    with torch.no_grad():
        a = ours(ids, labels=target)
        b = hf(ids, labels=target)
    assert max_diff(a.logits, b.logits) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < ATOL


def test_question_answering(hf_checkpoint):
    ours, hf = load_pair(hf_checkpoint, "OPTForQuestionAnswering")
    ids = torch.randint(3, 1000, (2, 10))
    start, end = torch.tensor([1, 30]), torch.tensor([4, 6])  # 30 is outside: ignored as in HF
    with torch.no_grad():
        a = ours(ids, start_positions=start, end_positions=end)
        b = hf(ids, start_positions=start, end_positions=end)
    assert max_diff(a.start_logits, b.start_logits) < ATOL
    assert max_diff(a.end_logits, b.end_logits) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < ATOL


def test_past_key_values_alias_cache_and_legacy_tuples(hf_checkpoint):
    ours, _ = load_pair(hf_checkpoint)
    ids = torch.randint(3, 1000, (1, 6))
    with torch.no_grad():
        first = ours(ids[:, :4], use_cache=True).past_key_values
        legacy = first.to_legacy()
        a = ours(ids[:, 4:], past_key_values=legacy).logits
        b = ours(ids[:, 4:], cache=qopt.KVCache.from_legacy(legacy)).logits
        full = ours(ids).logits[:, 4:]
    assert max_diff(a, full) < ATOL and max_diff(b, full) < ATOL
