"""Next-token loss through a frozen output head, a chunk of tokens at a time, without the tokens x vocab logits.

Fine-tuning with LoRA leaves the (tied) output head frozen, so its backward needs only the gradient with respect
to the hidden states: (softmax(h W^T) - onehot(label)) W / tokens. The usual path keeps, until the backward, the
logits, their fp32 copy and the log-softmax (3 x tokens x vocab x 4 bytes: 309 MiB for OPT-125M at 4 x 128 tokens,
half of a QLoRA step's peak on a CPU) and walks those tensors again in the backward. Here each chunk's logits are
made, reduced to its loss and turned into its hidden-state gradient at once, during the forward; the backward only
scales the stored gradient. The matmuls are the same two the usual path does (a frozen weight gets no gradient),
so the step is as fast or faster and the head's memory is one chunk. This is the idea of Liger-Kernel's fused
linear cross-entropy, for a frozen weight.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20  # fp32 logits of one chunk; larger chunks add memory, not speed


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk: CHUNK_BYTES of fp32 logits."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def frozen_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden` (batch x seq x dim) through `weight` (vocab x dim), as
    `causal_lm_loss(hidden @ weight.T, labels)` computes it: labels are shifted here, `ignore_index` is skipped.
    The logits are computed in `weight`'s dtype and reduced in fp32; no gradient reaches `weight`."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:].to(hidden.device)
    return _FrozenHeadLoss.apply(hidden, weight.detach(), targets.reshape(-1), ignore_index)


class _FrozenHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                ignore_index: int) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        valid = targets != ignore_index
        count = valid.sum().clamp_min(1)
        grad = torch.empty_like(flat) if hidden.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        chunk = chunk_rows(weight.shape[0])
        with torch.autocast(flat.device.type, enabled=False):
            for start in range(0, flat.shape[0], chunk):
                rows = slice(start, start + chunk)
                logp = torch.log_softmax((flat[rows].to(weight.dtype) @ weight.T).float(), dim=-1)
                keep = valid[rows]
                target = targets[rows].clamp_min(0)[:, None]
                total -= (logp.gather(1, target)[:, 0] * keep).sum()
                if grad is None:
                    continue
                probs = logp.exp_()  # softmax, in place of the log-probabilities
                probs.scatter_add_(1, target, -keep[:, None].to(probs.dtype))
                probs.mul_((keep / count)[:, None])
                grad[rows] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        if grad is not None:
            ctx.save_for_backward(grad.view_as(hidden))
        return total / count

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None
