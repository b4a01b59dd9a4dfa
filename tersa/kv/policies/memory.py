"""The KV bytes a policy keeps in memory and reads per decode step, at a given context length.

An **entry** is one position's key and value in one layer: ``2 · Hkv · d`` numbers. For a query
that sees ``n`` keys with a budget of ``b`` tokens:

============  ===========================================  =========================================
policy        kept                                         read per step
============  ===========================================  =========================================
dense         ``n``                                        ``n``
streaming     ``min(n, b)`` (evicted)                      ``min(n, b)``
snapkv        ``min(L, b)`` of the prompt ``L`` (evicted)  as kept
quest         ``n`` + per page min and max keys            selected pages × ``G`` + page bounds
moba          ``n`` + per block mean keys                  selected blocks × ``G`` + means
============  ===========================================  =========================================

Quest and MoBA choose per query head by default, so with grouped KV heads each head of a group
reads its own pages: their reads are counted per query head (``G = Hq/Hkv``), as their kernels
read them. With ``heads: kv`` a group shares one selection and ``G = 1``.
Page bounds (min and max) take one entry's bytes per page, block means half of one. The first
``dense_layers`` layers count as dense; a RAT+ layer adds its recurrent state (``2 · Hkv · d``
float32 numbers). Reads count keys and values only, not the query or the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from tersa.kv.policies.config import (
    KVPolicy,
    MobaPolicy,
    QuestPolicy,
    SnapKVPolicy,
    StreamingPolicy,
)
from tersa.kv.policies.select import pages_for_budget


@dataclass(frozen=True)
class KVLayout:
    """What one cached position costs: layers, heads, head size, bytes per number, RAT+ state."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    state_bytes: int = 0  # per layer (RAT+'s running k̃, ṽ)

    @property
    def entry_bytes(self) -> int:
        """One position's key and value in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def of(cls, model: nn.Module) -> KVLayout:
        """The layout of a transformers decoder or a RAT+ model (cache dtype: the weights')."""
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        dtype_bytes = next(model.parameters()).element_size()
        state = 0
        if getattr(cfg, "model_type", None) == "ratplus" and cfg.recurrent:
            state = 2 * kv_heads * head_dim * 4
        return cls(cfg.num_hidden_layers, heads, kv_heads, head_dim, dtype_bytes, state)


def layer_entries(policy: KVPolicy, layout: KVLayout, context: int) -> tuple[float, float]:
    """``(kept, read)`` entries of one active layer for a query that sees ``context`` keys."""
    n = context
    group = layout.q_heads // layout.kv_heads
    if policy.is_dense:
        return n, n
    if isinstance(policy, StreamingPolicy | SnapKVPolicy):
        kept = min(n, policy.tokens(n))
        return kept, kept
    if isinstance(policy, QuestPolicy | MobaPolicy):
        size = policy.page if isinstance(policy, QuestPolicy) else policy.block
        pages = math.ceil(n / size)
        summary = pages * (1.0 if isinstance(policy, QuestPolicy) else 0.5)
        selected = min(n, pages_for_budget(policy, n) * size)
        readers = 1 if policy.heads == "kv" else group
        return n + summary, readers * selected + summary
    return n, n


@dataclass(frozen=True)
class KVTraffic:
    """Bytes kept and read per decode step, with the dense figures they compare to."""

    kept_bytes: int
    read_bytes: int
    dense_bytes: int

    @property
    def kept_fraction(self) -> float:
        return self.kept_bytes / self.dense_bytes

    @property
    def read_fraction(self) -> float:
        return self.read_bytes / self.dense_bytes


def kv_traffic(policy: KVPolicy, layout: KVLayout, context: int) -> KVTraffic:
    """What ``policy`` keeps and reads in the whole model at a context of ``context`` tokens."""
    kept = read = 0.0
    for layer in range(layout.layers):
        if layer < policy.dense_layers:
            k, r = float(context), float(context)
        else:
            k, r = layer_entries(policy, layout, context)
        kept += k * layout.entry_bytes + layout.state_bytes
        read += r * layout.entry_bytes + layout.state_bytes
    dense = layout.layers * (context * layout.entry_bytes + layout.state_bytes)
    return KVTraffic(round(kept), round(read), dense)
