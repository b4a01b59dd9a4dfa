"""RAT+ as transformers classes: ``RatPlusModel`` and ``RatPlusForCausalLM`` (``model_type: ratplus``).

A block is Llama's (RMSNorm, attention, RMSNorm, SwiGLU MLP; the same parameter names) with a
RAT+ attention (arXiv 2602.18196): the keys and values pass through the gated recurrence
``k̃_t = g_t ⊙ k̃_{t−1} + (1 − g_t) ⊙ k_t`` (``ṽ`` alike, one gate per key/value channel) over the
whole sequence, then RoPE rotates ``q`` and ``k̃``, attention runs over ``(k̃, ṽ)`` under the layer's
:class:`~tersa.kv.masks.KVPattern`, and an output gate ``σ(W_z x)`` scales the result before
``o_proj``. ``attention: "attention"`` is the twin without the recurrence.

Positions are ``0 .. T−1`` continuing the cache (``position_ids`` is ignored) and padding is not
supported (an ``attention_mask`` with zeros raises).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from tersa.kernels.ratplus_decode import ratplus_decode
from tersa.kv.cache import RatPlusCache, RatPlusLayerCache
from tersa.kv.configuration_ratplus import RatPlusConfig, pattern_json
from tersa.kv.masks import KVPattern, layer_patterns, pattern_mask
from tersa.kv.policies.attention import policy_attention
from tersa.kv.scan import gated_scan, gated_step


class RatPlusRMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's default RoPE tables for ``positions [T]``: ``(cos, sin)`` ``[T, head_dim]``."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, d]`` (Llama's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class RatPlusMLP(nn.Module):
    def __init__(self, config: RatPlusConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RatPlusAttention(nn.Module):
    """RAT+ attention (or the plain-attention twin) under one :class:`KVPattern`."""

    def __init__(self, config: RatPlusConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.scan_chunk = config.scan_chunk
        self.pattern = layer_patterns(config.kv_pattern, config.num_hidden_layers)[layer_idx]
        h, q_dim, kv_dim = (
            config.hidden_size,
            self.n_heads * self.head_dim,
            self.n_kv * self.head_dim,
        )
        self.q_proj = nn.Linear(h, q_dim, bias=False)
        self.k_proj = nn.Linear(h, kv_dim, bias=False)
        self.v_proj = nn.Linear(h, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, h, bias=False)
        self.out_gate_proj = nn.Linear(h, q_dim, bias=True)
        self.out_gate_proj.bias_init = config.output_gate_bias_init  # read by _init_weights
        self.forget_gate_proj = None
        if config.recurrent:  # one forget gate per key/value channel, shared by k and v
            self.forget_gate_proj = nn.Linear(h, kv_dim, bias=True)
            self.forget_gate_proj.bias_init = config.forget_gate_bias_init

    def recur(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k̃, ṽ, state)``: ``k``, ``v`` ``[B, T, Hkv, d]`` through the gated recurrence from
        ``h0 = cat(k̃, ṽ) [B, Hkv, 2d]`` (zeros when None); ``state`` is the last ``cat(k̃, ṽ)``
        in float32."""
        assert self.forget_gate_proj is not None
        bsz, t, _, d = k.shape
        g = torch.sigmoid(self.forget_gate_proj(x).float()).view(bsz, t, self.n_kv, d)
        a = torch.cat([g, g], -1)  # [B, T, Hkv, 2d]
        b = (1.0 - a) * torch.cat([k, v], -1).float()
        if t == 1 and h0 is not None:
            h = gated_step(a[:, 0], b[:, 0], h0).unsqueeze(1)
        else:
            h, _ = gated_scan(a, b, h0, self.scan_chunk)
        return h[..., :d].to(k.dtype), h[..., d:].to(v.dtype), h[:, -1]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of ``q [B, H, Tq, d]`` over ``k, v [B, Hkv, Tk, d]`` under the pattern (and
        the KV policy, when :func:`tersa.kv.policies.apply_kv_policy` set one)."""
        state = getattr(self, "tersa_kv", None)
        if state is not None:
            allowed = None if self.pattern.dense else pattern_mask(q_pos, k_pos, self.pattern)
            return policy_attention(q, k, v, q_pos, k_pos, state, allowed=allowed)
        if self.n_kv != self.n_heads:
            group = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        if self.pattern.dense and q_pos.shape == k_pos.shape and bool((q_pos == k_pos).all()):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = pattern_mask(q_pos, k_pos, self.pattern)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: RatPlusLayerCache | None = None
    ) -> torch.Tensor:
        """``x [B, T, hidden]`` at ``positions [T]`` -> ``[B, T, hidden]``; updates ``cache``."""
        bsz, t, _ = x.shape
        q = self.q_proj(x).view(bsz, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(bsz, t, self.n_kv, self.head_dim)
        state = None
        if self.forget_gate_proj is not None:
            k, v, state = self.recur(x, k, v, None if cache is None else cache.state)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, heads, T, d]
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoPE after the recurrence

        if cache is None:
            out = self.attend(q, k, v, positions, positions)
        elif t == 1:  # decode: the cache, with this token in, is exactly what the query sees
            cache.append_one(k, v, state)
            if getattr(self, "tersa_kv", None) is not None:  # a KV policy selects among them
                entries = cache.entries()
                assert entries is not None
                out = self.attend(q, entries[0], entries[1], positions, entries[2])
            else:
                assert cache.keys is not None and cache.values is not None
                out = ratplus_decode(q[:, :, 0], cache.keys, cache.values, cache.n_valid)
                out = out.unsqueeze(2)
        else:  # prefill (or a chunk of it): past entries and the new tokens under the mask
            past = cache.entries()
            k_all, v_all, k_pos = k, v, positions
            if past is not None:
                k_all, v_all = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
                k_pos = torch.cat([past[2], positions])
            out = self.attend(q, k_all, v_all, positions, k_pos)
            cache.append_many(k, v, state)
        out = out.transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(self.out_gate_proj(x)))


class RatPlusDecoderLayer(nn.Module):
    def __init__(self, config: RatPlusConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = RatPlusAttention(config, layer_idx)
        self.mlp = RatPlusMLP(config)
        self.input_layernorm = RatPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RatPlusRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: RatPlusLayerCache | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class RatPlusPreTrainedModel(PreTrainedModel):
    config_class = RatPlusConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["RatPlusDecoderLayer"]

    def __init__(self, config: RatPlusConfig, *args: Any, **kwargs: Any) -> None:
        # from_pretrained(path, kv_pattern=...) sets the field after the config's checks
        config.kv_pattern = pattern_json(config.kv_pattern, config.num_hidden_layers)
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # the gate biases are set on the Linear itself: transformers skips init for modules
        # without parameters of their own (RatPlusAttention) when the model is not its code
        super()._init_weights(module)
        bias_init = getattr(module, "bias_init", None)
        if bias_init is not None:
            init.constant_(module.bias, bias_init)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own RatPlusCache

    def kv_patterns(self) -> list[KVPattern]:
        """The pattern of every layer."""
        return layer_patterns(self.config.kv_pattern, self.config.num_hidden_layers)

    def set_kv_pattern(self, value: Any) -> None:
        """Switch every layer's inference pattern: one pattern (dict, :class:`KVPattern`,
        ``"dense"``, None) or a list with one per layer. Caches built before keep theirs."""
        self.config.kv_pattern = pattern_json(value, self.config.num_hidden_layers)
        for module in self.modules():
            if isinstance(module, RatPlusAttention):
                module.pattern = self.kv_patterns()[module.layer_idx]


class RatPlusModel(RatPlusPreTrainedModel):
    def __init__(self, config: RatPlusConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [RatPlusDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RatPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: RatPlusCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Hidden states ``[B, T, hidden]``; with ``use_cache`` (default in eval) also the cache."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "RAT+ does not support padding (the recurrence would run over pad tokens); "
                "batch sequences of one length or run them one at a time"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = RatPlusCache(self.kv_patterns())
        past = 0 if cache is None else cache.get_seq_length()
        positions = torch.arange(past, past + x.shape[1], device=x.device)
        for i, layer in enumerate(self.layers):
            # keywords: tersa's block-by-block calibration replays a block's keyword arguments
            x = layer(x, positions=positions, cache=None if cache is None else cache[i])
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


class RatPlusForCausalLM(RatPlusPreTrainedModel, GenerationMixin):
    """RAT+ language model. ``generate`` works with the compact cache (greedy and sampling; no
    padding, no assisted decoding).

    Example::

        model = RatPlusForCausalLM.from_pretrained(path, kv_pattern={"dilation": 16, "window": 4})
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RatPlusConfig) -> None:
        super().__init__(config)
        self.model = RatPlusModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: RatPlusCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, T, vocab]`` (the last ``logits_to_keep`` when > 0), the mean next-token
        cross entropy when ``labels`` (``-100`` ignored), and the cache."""
        out = self.model(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, **kwargs
        )
        hidden = out.last_hidden_state
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
