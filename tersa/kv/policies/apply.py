"""Put a KV policy on a model: Llama-family transformers models and RAT+ alike.

Each attention module gets a :class:`~tersa.kv.policies.attention.KVState` as ``module.tersa_kv``.
RAT+ attention reads it itself. For transformers models tersa registers an attention function
``"tersa_kv"`` with transformers' ``AttentionInterface`` and switches the model to it: the function
runs :func:`~tersa.kv.policies.attention.policy_attention` on modules that carry a state and
transformers' SDPA on the others.

Example::

    apply_kv_policy(model, {"name": "quest", "budget": 0.125, "page": 16})
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    with kv_policy(model, "snapkv", prefill=prompt_len):   # teacher-forced scoring in one pass
        logits = model(input_ids=torch.cat([prompt, answer], 1)).logits
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tersa.errors import ModelError
from tersa.kv.policies.attention import KVState, policy_attention
from tersa.kv.policies.config import KVPolicy, make_policy

ATTENTION_NAME = "tersa_kv"
STATE_ATTR = "tersa_kv"


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, Hq, Tq, d]`` over the whole cache
    ``key, value [B, Hkv, Tk, d]`` (positions ``0 .. Tk−1``; queries the last ``Tq``) ->
    ``([B, Tq, Hq, d], None)``. Padding masks are not supported under a policy."""
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    tk, tq = key.shape[2], query.shape[2]
    k_pos = torch.arange(tk, device=key.device)
    out = policy_attention(query, key, value, k_pos[tk - tq :], k_pos, state, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder, in layer order (they carry ``layer_idx``)."""
    found = [
        m
        for name, m in model.named_modules()
        if name.endswith("self_attn") and isinstance(getattr(m, "layer_idx", None), int)
    ]
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no decoder self-attention modules with a layer index; "
            "KV policies support Llama-family transformers models and RAT+"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def apply_kv_policy(
    model: nn.Module, policy: KVPolicy | dict[str, Any] | str | None, prefill: int | None = None
) -> KVPolicy:
    """Set ``policy`` on every attention layer of ``model`` (None, ``"dense"`` or a budget of 1.0
    removes it: the model's own attention runs).

    :param prefill: fixed prompt length (positions ``>= prefill`` decode under the policy);
        None: the first pass's length minus one (see :mod:`tersa.kv.policies.attention`).
    """
    resolved = make_policy(policy)
    modules = attention_modules(model)
    hf = getattr(model.config, "model_type", None) != "ratplus"
    if resolved.is_dense:  # dense or a budget of 1.0: the model's own attention, bit for bit
        for m in modules:
            _set_state(m, None)
        return resolved
    if hf and model.config._attn_implementation != ATTENTION_NAME:
        # modules without a state fall back to SDPA, so the switch need not be undone
        model.set_attn_implementation(ATTENTION_NAME)
    for m in modules:
        _set_state(m, KVState(resolved, m.layer_idx, fixed_prefill=prefill))
    return resolved


def current_policy(model: nn.Module) -> KVPolicy:
    """The policy set on ``model`` (dense when none)."""
    state = getattr(attention_modules(model)[0], STATE_ATTR, None)
    return make_policy(None if state is None else state.policy)


@contextmanager
def kv_policy(
    model: nn.Module, policy: KVPolicy | dict[str, Any] | str | None, prefill: int | None = None
) -> Iterator[KVPolicy]:
    """Apply ``policy`` (and a fixed ``prefill``) for the ``with`` block; restore the previous."""
    modules = attention_modules(model)
    before = [getattr(m, STATE_ATTR, None) for m in modules]
    try:
        yield apply_kv_policy(model, policy, prefill)
    finally:
        for m, state in zip(modules, before, strict=True):
            _set_state(m, state)


def _set_state(module: nn.Module, state: KVState | None) -> None:
    """Give ``module`` its policy state, or remove it (None: the module attends densely)."""
    if state is not None:
        setattr(module, STATE_ATTR, state)
    elif hasattr(module, STATE_ATTR):
        delattr(module, STATE_ATTR)
