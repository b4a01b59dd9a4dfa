"""Query-aware and eviction KV policies (StreamingLLM, SnapKV, Quest, MoBA) for decoding.

- :func:`make_policy`, :class:`KVPolicy` and its subclasses: configs and budgets
  (:mod:`tersa.kv.policies.config`);
- :func:`apply_kv_policy`, :func:`kv_policy`: put a policy on a transformers Llama-family model or
  a RAT+ model (:mod:`tersa.kv.policies.apply`);
- :func:`policy_attention`: the attention itself (:mod:`tersa.kv.policies.attention`);
- :func:`kv_traffic`: bytes a policy keeps and reads per decode step
  (:mod:`tersa.kv.policies.memory`).
"""

from tersa.kv.policies.apply import apply_kv_policy, current_policy, kv_policy
from tersa.kv.policies.attention import KVState, policy_attention
from tersa.kv.policies.config import (
    POLICIES,
    DensePolicy,
    KVPolicy,
    MobaPolicy,
    QuestPolicy,
    SnapKVPolicy,
    StreamingPolicy,
    make_policy,
)

__all__ = [
    "POLICIES",
    "DensePolicy",
    "KVPolicy",
    "KVState",
    "MobaPolicy",
    "QuestPolicy",
    "SnapKVPolicy",
    "StreamingPolicy",
    "apply_kv_policy",
    "current_policy",
    "kv_policy",
    "make_policy",
    "policy_attention",
]
