"""The OPT network in plain torch: attention, decoder layer, decoder, `OPTModel` and its three heads.

Module and parameter names match Hugging Face's (`model.decoder.layers.0.self_attn.q_proj.weight`), so HF
checkpoints and PEFT adapters address the same tensors here.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache
from .config import OPTConfig
from .head_loss import frozen_head_loss
from .outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
)

_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
        "swish": F.silu, "tanh": torch.tanh, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
LAYER_PREFIX = "model.decoder.layers."  # decoder layer i of a model with a head is f"{LAYER_PREFIX}{i}"
_LAYER_NAME = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)(?=\.|$)")
POSITION_OFFSET = 2  # OPT reserves the first two position rows (fairseq's padding offset)


def decoder_layer_index(name: str) -> int | None:
    """The decoder layer a module, parameter or checkpoint key belongs to ("model.decoder.layers.3.fc1" -> 3,
    fairseq-era "decoder.layers.3" -> 3); None outside the decoder layers."""
    match = _LAYER_NAME.search(name)
    return int(match.group(1)) if match else None


def is_decoder_layer(name: str) -> bool:
    """True for the name of a decoder layer itself ("model.decoder.layers.3"), not for what it holds."""
    index = decoder_layer_index(name)
    return index is not None and name.endswith(f"layers.{index}")


def input_device(model: Any, fallback: torch.device | None = None) -> torch.device:
    """Where token ids must go: the input embedding's device (accelerate-dispatched layers move activations on
    from there). Any HF-style model works, transformers' too. An embedding left on meta (its hook places
    inputs itself) keeps `fallback`, default the CPU."""
    embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(embeddings(), "weight", None) if callable(embeddings) else None
    device = weight.device if isinstance(weight, torch.Tensor) else getattr(model, "device", None)
    if not isinstance(device, torch.device):
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = first.device if first is not None else torch.device("cpu")
    return (fallback or torch.device("cpu")) if device.type == "meta" else device


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """Positions count only attended tokens, so left padding does not shift a prompt's positions."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings + POSITION_OFFSET, embedding_dim)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(position_ids + POSITION_OFFSET)


def positions_from_mask(attention_mask: torch.Tensor, past_length: int) -> torch.Tensor:
    positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
    return positions[:, past_length:]


def build_attention_mask(attention_mask: torch.Tensor, query_length: int, past_length: int) -> torch.Tensor:
    """Boolean (batch, 1, query, key) mask, True = may attend: causal and padding combined.

    Rows that may attend to nothing (queries at padded positions) are opened fully so softmax never sees an
    all-masked row; those positions' outputs are ignored anyway.
    """
    key_length = attention_mask.shape[1]
    q_pos = torch.arange(past_length, past_length + query_length, device=attention_mask.device)
    k_pos = torch.arange(key_length, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    mask = causal[None, None] & attention_mask[:, None, None, :].bool()
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                           ) -> torch.Tensor:
    """One query per row (a decode step) in 16 bits on CPU: fp32 matmuls are faster than SDPA's CPU kernel at
    one query (docs/benchmarks.md), which also computes in fp32, so the result rounds the same way."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        self.layer_idx = layer_idx
        bias = config.enable_bias
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor, layer_head_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states) * self.scaling)
        k = self._heads(self.k_proj(hidden_states))
        v = self._heads(self.v_proj(hidden_states))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # in the cache's dtype, which may be wider than q's
        dropout = self.dropout if self.training else 0.0
        mask = mask.to(q.device) if mask is not None else None
        weights = None
        if s == 1 and q.device.type == "cpu" and q.dtype != torch.float32 and not dropout \
                and not output_attentions and layer_head_mask is None:
            out = single_query_attention(q, k, v, mask)
        elif output_attentions or layer_head_mask is not None:
            # eager path: softmax in fp32 so half-precision padded rows never overflow to NaN
            k, v = k.to(q.dtype), v.to(q.dtype)
            scores = torch.matmul(q, k.transpose(-1, -2)).float()
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            weights = F.dropout(scores.softmax(dim=-1).to(q.dtype), p=dropout, training=self.training)
            if layer_head_mask is not None:
                weights = weights * layer_head_mask.view(1, -1, 1, 1).to(weights)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout,
                                                 scale=1.0)
        out = out.transpose(1, 2).reshape(b, s, self.embed_dim)
        return self.out_proj(out), (weights if output_attentions else None)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        affine = config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config, layer_idx)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation_fn = _ACT[config.activation_function]
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor, layer_head_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, weights = self.self_attn(hidden_states, mask, layer_head_mask, cache, output_attentions)
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states, weights


# -- the Hugging Face facade ------------------------------------------------------------------------------------
# The one place where the network reaches up the pipeline. `from_pretrained`, `save_pretrained` and `generate`
# are the methods HF users call on a model; the loader, the saver and the decoder implement them. The imports
# are lazy so that the network itself needs only torch (tests/test_layers.py allows exactly these three).
class _PretrainedFacade:
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a local HF checkpoint folder; keyword arguments are those of `qopt.load`."""
        from ..loading.loader import load

        return load(path, model_class=cls, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike, max_shard_size: str | int = "2GB") -> None:
        """Write config.json and (sharded) safetensors atomically, quantized modules in bitsandbytes' layout."""
        from ..loading.saving import save_model

        save_model(self, folder, max_shard_size=max_shard_size)


class _GenerationFacade:
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.LongTensor:
        """`qopt.generate` on this model; see it for the arguments."""
        from ..generation.decoding import generate

        return generate(self, input_ids, attention_mask, **kwargs)  # type: ignore[arg-type]


class OPTPreTrainedModel(_PretrainedFacade, nn.Module):
    """Shared plumbing: weight init, tying, dtype/device, gradient checkpointing, load and save."""

    base_model_prefix = "model"

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Heads that share the input embedding (OPT's lm_head) override this."""

    def get_decoder(self) -> OPTDecoder:
        return self.model.decoder if hasattr(self, "model") else self._modules["decoder"]

    @property
    def dtype(self) -> torch.dtype:
        return self.get_decoder().embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.get_decoder().embed_tokens.weight.device

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def gradient_checkpointing_enable(self, layers: int | None = None, **_hf_kwargs: Any) -> None:
        """Recompute decoder layers in backward instead of keeping their activations: the first `layers` of
        them (default all), so memory left over can buy back the recomputation of the rest."""
        decoder = self.get_decoder()
        decoder.gradient_checkpointing = True
        decoder.checkpointed_layers = len(decoder.layers) if layers is None else layers

    def gradient_checkpointing_disable(self) -> None:
        self.get_decoder().gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.get_decoder().embed_tokens



class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim, self.padding_idx)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        projected = config.word_embed_proj_dim != config.hidden_size
        self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if projected else None
        self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if projected else None
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(config.hidden_size,
                                                 elementwise_affine=config.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.checkpointed_layers = config.num_hidden_layers  # with checkpointing on: layers 0 .. this - 1

    def embed(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
              position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the first decoder layer reads: (hidden states, boolean attention mask or None). A stage of its own
        so that a layer-major runner (`qopt.loading.layer_runner`) computes exactly what `forward` does."""
        batch, seq = inputs_embeds.shape[:2]
        unpadded = attention_mask is None
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + seq, dtype=torch.long, device=inputs_embeds.device)
        elif attention_mask.shape[1] != past + seq:
            raise ValueError(f"attention_mask has length {attention_mask.shape[1]}, expected past ({past}) + "
                             f"new ({seq}) = {past + seq}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past)
        if position_ids.max() >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is past max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        pos_embeds = self.embed_positions(position_ids.to(self.embed_positions.weight.device))
        hidden_states = inputs_embeds + pos_embeds.to(inputs_embeds.device)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        # one new token per row with no padding sees every cached key: no mask to build (the decode step)
        mask = None if unpadded and seq == 1 else build_attention_mask(attention_mask, seq, past)
        return hidden_states, mask

    def finish(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The last decoder layer's output -> what the heads read (final layer norm, projection)."""
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                return_dict: bool = True, position_ids: torch.Tensor | None = None) -> Any:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cache = past_key_values
        if cache is not None and not isinstance(cache, KVCache):
            cache = KVCache.from_legacy(cache)
        if cache is None and use_cache:
            cache = KVCache(len(self.layers))
        past = cache.get_seq_length() if cache is not None else 0
        hidden_states, mask = self.embed(inputs_embeds, attention_mask, past, position_ids)
        if head_mask is not None and head_mask.dim() == 1:
            head_mask = head_mask.unsqueeze(0).expand(len(self.layers), -1)

        all_hidden, all_attn = [], []
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            layer_head_mask = head_mask[idx] if head_mask is not None else None
            if self.gradient_checkpointing and self.training and idx < self.checkpointed_layers:
                hidden_states, weights = checkpoint(layer, hidden_states, mask, layer_head_mask, None,
                                                    output_attentions, use_reentrant=False)
            else:
                hidden_states, weights = layer(hidden_states, mask, layer_head_mask, cache, output_attentions)
            if output_attentions:
                all_attn.append(weights)
        hidden_states = self.finish(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        out = BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=cache if use_cache else None,
                                      hidden_states=tuple(all_hidden) if output_hidden_states else None,
                                      attentions=tuple(all_attn) if output_attentions else None)
        return out if return_dict else out.to_tuple()


class OPTModel(OPTPreTrainedModel):
    base_model_prefix = ""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.decoder = OPTDecoder(config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.decoder(*args, **_aliases(kwargs))


def _aliases(kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 renamed `past_key_values` to `cache`; accept both."""
    if "cache" in kwargs:
        kwargs["past_key_values"] = kwargs.pop("cache")
    return kwargs


class _WithDecoder(OPTPreTrainedModel):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.model = OPTModel(config)

    def _run(self, kwargs: dict[str, Any]) -> tuple[BaseModelOutputWithPast, bool]:
        return_dict = kwargs.pop("return_dict", None)
        out = self.model.decoder(**_aliases(kwargs), return_dict=True)
        return out, return_dict is not False


class OPTForCausalLM(_WithDecoder, _GenerationFacade):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tie_weights()
        # with labels and a frozen plain head: the loss chunk by chunk, no logits returned (head_loss.py)
        self.fused_loss = False

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> Any:
        out, return_dict = self._run({"input_ids": input_ids, **kwargs})
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head = self.lm_head
        if labels is not None and self.fused_loss and type(head) is nn.Linear and not head.weight.requires_grad:
            logits, loss = None, frozen_head_loss(hidden.to(head.weight.device), head.weight, labels)
        else:
            logits = head(hidden.to(head.weight.device))
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; label -100 is ignored."""
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=ignore_index)


class OPTForSequenceClassification(_WithDecoder):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.word_embed_proj_dim, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        out, return_dict = self._run({"input_ids": input_ids, **kwargs})
        logits = self.score(out.last_hidden_state)
        batch = logits.shape[0]
        if input_ids is None or self.config.pad_token_id is None:
            last = torch.full((batch,), -1, device=logits.device)
        else:  # last non-pad token; works for left and right padding
            non_pad = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = self._loss(pooled, labels) if labels is not None else None
        result = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                  hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float()) if self.num_labels == 1 \
                else F.mse_loss(logits.float(), labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class OPTForQuestionAnswering(_WithDecoder):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.word_embed_proj_dim, 2)

    def forward(self, input_ids: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("use_cache", False)
        out, return_dict = self._run({"input_ids": input_ids, **kwargs})
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)  # positions outside the sequence are ignored
            start = start_positions.view(-1).clamp(0, ignored).to(start_logits.device)
            end = end_positions.view(-1).clamp(0, ignored).to(end_logits.device)
            loss = (F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                    + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)) / 2
        result = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


MODEL_CLASSES = {cls.__name__: cls for cls in (OPTModel, OPTForCausalLM, OPTForSequenceClassification,
                                               OPTForQuestionAnswering)}
