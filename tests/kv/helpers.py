"""Tiny RAT+ models for the kv tests."""

from __future__ import annotations

from typing import Any

import torch

from tersa.kv import RatPlusConfig, RatPlusForCausalLM

VOCAB = 97


def tiny_config(**overrides: Any) -> RatPlusConfig:
    """Hidden 48, 2 layers, 4 query heads over 2 KV heads of 12, intermediate 80, vocab 97."""
    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "scan_chunk": 4,  # several chunks even at test lengths
        **overrides,
    }
    return RatPlusConfig(**fields)


def tiny_ratplus(seed: int = 0, **overrides: Any) -> RatPlusForCausalLM:
    """A random tiny RAT+ model in eval mode; the gate weights are scaled up so ``g`` varies by
    token (at init it is ~σ(3) everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RatPlusForCausalLM(tiny_config(**overrides))
        with torch.no_grad():
            for layer in model.model.layers:
                gate = layer.self_attn.forget_gate_proj
                if gate is not None:
                    gate.weight.normal_(0.0, 0.3)
                    gate.bias.uniform_(-1.0, 3.0)
                layer.self_attn.out_gate_proj.weight.normal_(0.0, 0.3)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)
