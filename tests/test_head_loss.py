"""The loss through a frozen head, a chunk at a time, equals the loss from the full logits (value and gradient)."""
import pytest
import torch

import qopt
import qopt.model.head_loss as head_loss
from qopt.model.head_loss import frozen_head_loss
from qopt.model.network import causal_lm_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_and_gradient_equal_the_full_logits_path(monkeypatch, dtype):
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 500 * 7)  # 7 tokens a chunk: 51 tokens -> 8 chunks
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 32, requires_grad=True)
    weight = torch.randn(500, 32).to(dtype)
    labels = torch.randint(0, 500, (3, 17))
    labels[0, :5] = -100  # ignored targets count neither in the sum nor in the mean
    fused = frozen_head_loss(hidden, weight, labels)
    (2 * fused).backward()
    fused_grad, hidden.grad = hidden.grad.clone(), None
    full = causal_lm_loss(hidden.to(dtype) @ weight.T, labels)
    (2 * full).backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=1e-5, atol=1e-7 if dtype == torch.float32 else 1e-3)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = frozen_head_loss(hidden, torch.randn(20, 8), torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0 and not hidden.grad.any()


def tiny_lm():
    torch.manual_seed(0)
    config = qopt.OPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                            num_attention_heads=4, max_position_embeddings=32, dropout=0.0)
    model = qopt.OPTForCausalLM(config)
    model.init_weights()
    return model


def test_the_model_takes_the_fused_path_only_with_a_frozen_plain_head():
    model = tiny_lm()
    ids = torch.randint(3, 300, (2, 12))
    reference = model(input_ids=ids, labels=ids)
    model.fused_loss = True
    trainable_head = model(input_ids=ids, labels=ids)  # the head still trains: the usual path
    assert trainable_head.logits is not None
    model.get_input_embeddings().weight.requires_grad_(False)
    fused = model(input_ids=ids, labels=ids)
    assert fused.logits is None  # never materialized
    torch.testing.assert_close(fused.loss, reference.loss)
    assert model(input_ids=ids).logits.shape == (2, 12, 300)  # without labels: logits as always


def test_training_grads_match_with_and_without_the_fused_loss():
    grads = []
    for fused in (False, True):
        model = tiny_lm()
        model.get_input_embeddings().weight.requires_grad_(False)
        model.fused_loss = fused
        ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
