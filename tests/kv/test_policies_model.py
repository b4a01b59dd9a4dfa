"""KV policies on whole models (tiny Llama, Qwen2 and RAT+): budget 1.0 is dense, one teacher-forced
pass equals step-by-step generation under the policy, a small budget changes the output."""

from __future__ import annotations

import pytest
import torch

from tersa.errors import ModelError
from tersa.kv.policies import KVState, apply_kv_policy, current_policy, kv_policy, make_policy
from tersa.kv.policies.apply import STATE_ATTR, attention_modules
from tersa.models.tiny import tiny_model
from tests.kv.helpers import random_ids, tiny_ratplus

POLICIES = [
    {"name": "streaming", "budget": 6, "sinks": 2},
    {"name": "snapkv", "budget": 0.3, "window": 4},
    {"name": "quest", "budget": 8, "page": 4},
    {"name": "moba", "budget": 0.25, "block": 4},
    {"name": "quest", "budget": 8, "page": 4, "heads": "kv"},
    {"name": "moba", "budget": 0.25, "block": 4, "heads": "kv"},
]


def _id(policy: dict) -> str:
    return policy["name"] + ("-kv" if policy.get("heads") == "kv" else "")


def models():
    return {
        "llama": tiny_model("llama", seed=0, num_attention_heads=4, num_key_value_heads=2),
        "qwen2": tiny_model("qwen2", seed=1),
        "ratplus": tiny_ratplus(seed=2),
    }


MODELS = models()


def logits(model, ids, policy=None, prefill=None):
    with torch.no_grad(), kv_policy(model, policy, prefill):
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("policy", POLICIES, ids=_id)
def test_budget_one_is_dense_exactly(arch: str, policy: dict) -> None:
    model, ids = MODELS[arch], random_ids(2, 30)
    dense = logits(model, ids)
    assert torch.equal(logits(model, ids, {**policy, "budget": 1.0}, prefill=10), dense)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("policy", POLICIES, ids=_id)
def test_forced_full_budget_math_is_dense(arch: str, policy: dict) -> None:
    """The policy path itself (not skipped) at budget 1.0 agrees with dense attention."""
    model, ids = MODELS[arch], random_ids(1, 30)
    dense = logits(model, ids)
    full = make_policy({**policy, "budget": 1.0})
    with torch.no_grad():
        for m in attention_modules(model):
            state = KVState(full, m.layer_idx, fixed_prefill=10)
            state.__class__ = _AlwaysActive
            setattr(m, STATE_ATTR, state)
        if arch != "ratplus":
            model.set_attn_implementation("tersa_kv")
        got = model(input_ids=ids, use_cache=False).logits
        apply_kv_policy(model, None)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


class _AlwaysActive(KVState):
    @property
    def active(self) -> bool:
        return True


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("policy", POLICIES, ids=_id)
def test_one_pass_equals_generation(arch: str, policy: dict) -> None:
    """generate (prompt prefilled, then cached decode steps) under the policy gives the tokens
    and scores of one teacher-forced pass with ``prefill = prompt − 1``."""
    model, prompt = MODELS[arch], random_ids(1, 29, seed=4)
    with torch.no_grad(), kv_policy(model, policy):
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    seq = out.sequences
    one_pass = logits(model, seq, policy, prefill=prompt.shape[1] - 1)
    steps = torch.stack(out.scores, 1)  # [1, 5, V]
    torch.testing.assert_close(one_pass[:, prompt.shape[1] - 1 : -1], steps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("policy", POLICIES, ids=_id)
def test_small_budget_changes_decode_only(arch: str, policy: dict) -> None:
    model, ids = MODELS[arch], random_ids(1, 40, seed=5)
    dense, sparse = logits(model, ids), logits(model, ids, policy, prefill=24)
    assert torch.equal(sparse[:, :24], dense[:, :24])  # the prompt runs dense
    assert (sparse[:, 24:] - dense[:, 24:]).abs().max() > 1e-3


def test_snapkv_needs_the_prompt_in_one_pass() -> None:
    model, ids = MODELS["llama"], random_ids(1, 20)
    policy = {"name": "snapkv", "budget": 0.5}
    with (
        torch.no_grad(),
        kv_policy(model, policy, prefill=12),
        pytest.raises(RuntimeError, match="SnapKV needs the whole prompt"),
    ):
        out = model(input_ids=ids[:, :8], use_cache=True)
        model(input_ids=ids[:, 8:], cache=out.cache, use_cache=True)


def test_context_restores_and_current_policy() -> None:
    model = MODELS["llama"]
    apply_kv_policy(model, {"name": "quest", "budget": 0.5})
    with kv_policy(model, "streaming"):  # default budget 1.0: dense
        assert current_policy(model).name == "dense"
    with kv_policy(model, {"name": "streaming", "budget": 8}):
        assert current_policy(model).name == "streaming"
    assert current_policy(model).name == "quest"
    apply_kv_policy(model, "dense")
    assert current_policy(model).name == "dense"
    assert not any(hasattr(m, STATE_ATTR) for m in attention_modules(model))


def test_unsupported_model_is_refused() -> None:
    with pytest.raises(ModelError, match="KV policies support Llama-family"):
        apply_kv_policy(tiny_model("bert"), "quest")
