"""Attention under a KV policy: the prompt runs dense, every later query under the policy's mask.

The protocol (one for every policy, model and task, so their numbers compare):

- a sequence starts when a forward pass holds position 0; its **prefill** length ``L`` is set
  then: ``kv_policy(model, policy, prefill=L)`` fixes it (teacher-forced scoring of a prompt and
  its answer in one pass), otherwise the first pass's length minus one. The prompt's last token is
  thus the first decode step: the first generated token is predicted under the policy, as it would
  be if the prompt had been cached before the question arrived;
- queries at positions ``< L`` attend densely (causal) — prefill is dense for all policies;
- queries at positions ``>= L`` attend to what the policy selects (:mod:`tersa.kv.policies.select`).
  SnapKV chooses its prompt keys once, from the window of queries ending at the first decode
  query (position ``L``: the prompt's last token, as in SnapKV), so the pass that holds position
  ``L`` must hold the whole prompt and window.

Evicting policies (StreamingLLM, SnapKV) are applied as masks over the full cache: the outputs are
those of the evicted cache exactly, but memory is not freed; :mod:`tersa.kv.policies.memory`
reports the bytes each policy keeps and reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tersa.kernels.quest_decode import quest_attention
from tersa.kv.policies.config import (
    KVPolicy,
    MobaPolicy,
    QuestPolicy,
    SnapKVPolicy,
    StreamingPolicy,
)
from tersa.kv.policies.select import causal, page_mask, snapkv_keep, streaming_mask


@dataclass
class KVState:
    """One attention layer's policy and the sequence state it needs."""

    policy: KVPolicy
    layer: int
    fixed_prefill: int | None = None
    prefill: int | None = None
    snap_keep: torch.Tensor | None = None  # [B, Hkv, L] SnapKV's kept prompt keys

    @property
    def active(self) -> bool:
        """False for a dense policy, a budget of 1.0 and the first ``dense_layers`` layers."""
        return not self.policy.is_dense and self.layer >= self.policy.dense_layers

    def start(self, q_len: int) -> None:
        """A new sequence whose first pass holds ``q_len`` queries."""
        self.prefill = self.fixed_prefill if self.fixed_prefill is not None else max(q_len - 1, 0)
        self.snap_keep = None


def policy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    state: KVState,
    scale: float | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q [B, Hq, Tq, d]`` over ``k, v [B, Hkv, Tk, d]`` under the policy.

    :param q_pos: query positions ``[Tq]``, ascending; ``k_pos`` key positions ``[Tk]``.
    :param allowed: an extra ``[Tq, Tk]`` mask ANDed in (a RAT+ layer's dilated pattern).
    :returns: ``[B, Hq, Tq, d]``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if int(q_pos[0]) == 0:
        state.start(q.shape[2])
    elif state.prefill is None:  # a cache filled before the policy was set: all of this decodes
        state.prefill = int(q_pos[0])
    base = causal(q_pos, k_pos)
    if allowed is not None:
        base = base & allowed
    group = q.shape[1] // k.shape[1]
    ke, ve = (t.repeat_interleave(group, 1) if group > 1 else t for t in (k, v))
    if not state.active:
        return _sdpa(q, ke, ve, base, scale)
    assert state.prefill is not None
    n_pre = int((q_pos < state.prefill).sum())
    out = []
    if n_pre:
        out.append(_sdpa(q[:, :, :n_pre], ke, ve, base[:n_pre], scale))
    if n_pre == 0 and _quest_step(state, q, k_pos, allowed):
        assert isinstance(state.policy, QuestPolicy)
        page, tk = state.policy.page, k.shape[2]
        n_pages = math.ceil(state.policy.tokens(tk) / page)
        shared = state.policy.heads == "kv"
        out1, _ = quest_attention(q[:, :, 0], k, v, tk, page, n_pages, scale, shared)
        return out1.unsqueeze(2)
    if n_pre < q.shape[2]:
        q_dec, pos_dec = q[:, :, n_pre:], q_pos[n_pre:]
        if isinstance(state.policy, SnapKVPolicy) and state.snap_keep is None:
            state.snap_keep = _snapkv_select(state, q, k, q_pos, k_pos, scale)
        mask = base[n_pre:] & decode_mask(state, q_dec, k, pos_dec, k_pos)
        out.append(_sdpa(q_dec, ke, ve, mask, scale))
    return torch.cat(out, 2) if len(out) > 1 else out[0]


def _quest_step(
    state: KVState, q: torch.Tensor, k_pos: torch.Tensor, allowed: torch.Tensor | None
) -> bool:
    """A single Quest decode step over a whole cache (positions ``0 .. T−1``): the kernel
    (:mod:`tersa.kernels.quest_decode`) scores the pages and reads only the selected ones."""
    return (
        isinstance(state.policy, QuestPolicy)
        and q.shape[2] == 1
        and allowed is None
        and bool((k_pos == torch.arange(k_pos.shape[0], device=k_pos.device)).all())
    )


def decode_mask(
    state: KVState, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
) -> torch.Tensor:
    """``[Tq, Tk]`` or ``[B, Hq, Tq, Tk]``: what decode queries ``q [B, Hq, Tq, d]`` select."""
    policy = state.policy
    if isinstance(policy, StreamingPolicy):
        return streaming_mask(policy, q_pos, k_pos)
    if isinstance(policy, QuestPolicy | MobaPolicy):
        return page_mask(policy, q, k, q_pos, k_pos)
    if isinstance(policy, SnapKVPolicy):
        assert state.snap_keep is not None and state.prefill is not None
        keep = state.snap_keep  # [B, Hkv, L]
        in_prompt = k_pos < state.prefill
        kept = torch.ones(*keep.shape[:2], k_pos.shape[0], dtype=torch.bool, device=keep.device)
        kept[:, :, in_prompt] = keep[:, :, k_pos[in_prompt]]
        kept = kept.repeat_interleave(q.shape[1] // keep.shape[1], 1)  # [B, Hq, Tk]
        return kept[:, :, None, :].expand(-1, -1, q.shape[2], -1)
    raise TypeError(f"no decode mask for policy {type(policy).__name__}")


def _snapkv_select(
    state: KVState,
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """SnapKV's kept prompt keys. The observation window is the ``window`` queries ending at the
    first decode query (position ``L``, the prompt's last token in a ``generate`` call), as
    SnapKV's own window ends at the prompt's last token."""
    policy = state.policy
    assert isinstance(policy, SnapKVPolicy) and state.prefill is not None
    length = state.prefill
    window = min(policy.window, length + 1)
    obs = (q_pos > length - window) & (q_pos <= length)
    prompt = k_pos < length
    if int(obs.sum()) != window or int(prompt.sum()) != length:
        raise RuntimeError(
            "SnapKV needs the whole prompt and its last window of queries in one forward pass "
            f"(prefill {length}, window {window}); run the prompt in one pass"
        )
    order = torch.argsort(k_pos[prompt])
    return snapkv_keep(policy, q[:, :, obs], k[:, :, prompt][:, :, order], q_pos[obs], scale)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    if mask.dim() == 2:
        mask = mask[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
