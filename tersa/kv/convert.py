"""Add the RAT+ recurrence to a pretrained Llama-family model.

Every Llama weight is copied (the parameter names are the same). The new gates start so that the
converted model computes what the Llama computes:

- the forget gate has zero weights and bias ``forget_gate_bias`` (default −6, ``g = σ(−6) ≈ 0.0025``),
  so ``k̃_t = 0.9975·k_t + 0.0025·k̃_{t−1} ≈ k_t``; the gate is then free to learn longer memories;
- the output gate has zero weights and bias ``output_gate_bias``, so it multiplies by the constant
  ``σ(output_gate_bias)``, and ``o_proj`` is divided by that constant: the output is exactly the
  Llama's at any bias. The default 0 (``σ = 0.5``) keeps the gate where its gradient is largest.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel

from tersa.kv.configuration_ratplus import RatPlusConfig
from tersa.kv.modeling_ratplus import RatPlusAttention, RatPlusForCausalLM

SUPPORTED_TYPES = ("llama", "mistral")


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"only the default RoPE converts; this checkpoint uses rope_type {rope_type!r}"
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def ratplus_config_from_llama(config: Any, **overrides: Any) -> RatPlusConfig:
    """A :class:`RatPlusConfig` with the Llama ``config``'s sizes; ``overrides`` set RAT+ fields."""
    if config.model_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"cannot convert model_type {config.model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("cannot convert a checkpoint with attention or MLP biases")
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError("cannot convert a sliding-window checkpoint (use kv_pattern instead)")
    fields = {
        name: getattr(config, name)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "initializer_range",
            "tie_word_embeddings",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        )
    }
    return RatPlusConfig(**fields, rope_theta=_rope_theta(config), **overrides)


@torch.no_grad()
def llama_to_ratplus(
    llama: PreTrainedModel,
    *,
    forget_gate_bias: float = -6.0,
    output_gate_bias: float = 0.0,
    kv_pattern: Any = None,
) -> RatPlusForCausalLM:
    """A :class:`RatPlusForCausalLM` holding ``llama``'s weights plus fresh gates (see the module).

    :param llama: a ``LlamaForCausalLM`` (or Mistral without sliding window), default RoPE, no
        biases.
    :param forget_gate_bias: initial forget-gate bias; ``g = σ(bias)`` for every token at first.
    :param output_gate_bias: initial output-gate bias (exactly compensated in ``o_proj``).
    :param kv_pattern: inference pattern(s) of the result (dense when None).
    :returns: the converted model, in ``llama``'s dtype and device, in eval mode.
    """
    config = ratplus_config_from_llama(
        llama.config,
        forget_gate_bias_init=forget_gate_bias,
        output_gate_bias_init=output_gate_bias,
        kv_pattern=kv_pattern,
    )
    param = next(llama.parameters())
    model = RatPlusForCausalLM(config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    new = ("out_gate_proj", "forget_gate_proj")
    bad_missing = [k for k in missing if not any(n in k for n in new)]
    if config.tie_word_embeddings:
        bad_missing = [k for k in bad_missing if k != "lm_head.weight"]
    if bad_missing or unexpected:
        raise ValueError(f"weights do not map: missing {bad_missing}, unexpected {unexpected}")
    out_scale = 1.0 / (1.0 / (1.0 + math.exp(-output_gate_bias)))
    for module in model.modules():
        if isinstance(module, RatPlusAttention):
            module.out_gate_proj.weight.zero_()
            module.out_gate_proj.bias.fill_(output_gate_bias)
            module.o_proj.weight.mul_(out_scale)
            assert module.forget_gate_proj is not None
            module.forget_gate_proj.weight.zero_()
            module.forget_gate_proj.bias.fill_(forget_gate_bias)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
