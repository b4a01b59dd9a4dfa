"""RatPlusForCausalLM: equivalences, compact-cache decoding, generate, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from tersa.eval.numerics import err_ratio
from tersa.kv import KVPattern, RatPlusConfig, RatPlusForCausalLM, cache_entries
from tersa.kv.modeling_ratplus import apply_rope, rope_cos_sin
from tests.kv.helpers import random_ids, tiny_config, tiny_ratplus

SPARSE = [
    {"dilation": 4, "window": 2, "sinks": 1},
    {"dilation": 3, "window": 0},
    {"dilation": None, "window": 5, "sinks": 2},
    [None, {"dilation": 5, "window": 4, "sinks": 7}],  # hybrid: dense first layer
]
# fp32 logits of two computations that differ only in summation order
LOGIT_TOL = 1e-5


def test_init_gate_biases_and_twin_size() -> None:
    model = RatPlusForCausalLM(tiny_config())
    attn = model.model.layers[0].self_attn
    assert torch.all(attn.forget_gate_proj.bias == 3.0)  # g ≈ 0.95 at the start
    assert torch.all(attn.out_gate_proj.bias == 0.0)
    twin = RatPlusForCausalLM(tiny_config(attention="attention"))
    assert twin.model.layers[0].self_attn.forget_gate_proj is None
    gates = sum(l.self_attn.forget_gate_proj.weight.numel() + 24 for l in model.model.layers)
    assert model.num_parameters() - twin.num_parameters() == gates
    custom = RatPlusForCausalLM(tiny_config(forget_gate_bias_init=1.5))
    assert torch.all(custom.model.layers[1].self_attn.forget_gate_proj.bias == 1.5)


def test_zero_gate_equals_attention_twin() -> None:
    model = tiny_ratplus()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.forget_gate_proj.weight.zero_()
            layer.self_attn.forget_gate_proj.bias.fill_(-1e4)  # g = σ(-1e4) = 0 exactly
    twin = RatPlusForCausalLM(tiny_config(attention="attention")).eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("forget_gate" in k for k in unexpected)
    ids = random_ids(2, 23)
    with torch.no_grad():
        assert err_ratio(twin(ids).logits, model(ids).logits) < LOGIT_TOL


def test_twin_attention_is_gated_causal_attention() -> None:
    twin = RatPlusForCausalLM(tiny_config(attention="attention")).eval()
    attn = twin.model.layers[0].self_attn
    x = torch.randn(2, 9, 48)
    pos = torch.arange(9)
    with torch.no_grad():
        got = attn(x, pos)
        q = attn.q_proj(x).view(2, 9, 4, 12).transpose(1, 2)
        k = attn.k_proj(x).view(2, 9, 2, 12).transpose(1, 2).repeat_interleave(2, 1)
        v = attn.v_proj(x).view(2, 9, 2, 12).transpose(1, 2).repeat_interleave(2, 1)
        cos, sin = rope_cos_sin(pos, 12, 10000.0, torch.float32)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / 12**0.5
        scores = scores.masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 48)
        want = attn.o_proj(y * torch.sigmoid(attn.out_gate_proj(x)))
    assert err_ratio(want, got) < LOGIT_TOL


def test_recurrence_runs_before_rope() -> None:
    """One layer's keys: the naive loop of the recurrence on k, then RoPE."""
    attn = tiny_ratplus().model.layers[0].self_attn
    x = torch.randn(1, 11, 48)
    with torch.no_grad():
        k = attn.k_proj(x).view(1, 11, 2, 12)
        g = torch.sigmoid(attn.forget_gate_proj(x)).view(1, 11, 2, 12)
        state, naive = torch.zeros(1, 2, 12), []
        for t in range(11):
            state = g[:, t] * state + (1 - g[:, t]) * k[:, t]
            naive.append(state)
        got, _, last = attn.recur(x, k, attn.v_proj(x).view(1, 11, 2, 12), None)
    torch.testing.assert_close(got, torch.stack(naive, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[..., :12], naive[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", [None, *SPARSE], ids=str)
@pytest.mark.parametrize("prefill", [[1], [6, 5]])  # decode from token 0; chunked prefill
def test_compact_cache_decode_matches_full_forward(pattern, prefill: list[int]) -> None:
    model = tiny_ratplus(kv_pattern=pattern)
    ids = random_ids(2, 23)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # the pattern as a mask over the sequence
        cache, logits, start = None, [], 0
        steps = prefill + [1] * (23 - sum(prefill))
        for size in steps:
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            logits.append(out.logits)
    assert err_ratio(full, torch.cat(logits, 1)) < LOGIT_TOL
    patterns = model.kv_patterns()
    entry, state = 2 * 2 * 2 * 12 * 4, 2 * 2 * 2 * 12 * 4  # k+v · B · Hkv · d · fp32
    want = sum(cache_entries(23, p) * entry + state for p in patterns)
    assert cache.kv_bytes() == want


def test_sparse_pattern_changes_the_output() -> None:
    model = tiny_ratplus()
    ids = random_ids(1, 30)
    with torch.no_grad():
        dense = model(ids).logits
        model.set_kv_pattern({"dilation": 8, "window": 1})
        sparse = model(ids).logits
    assert model.config.kv_pattern == {"dilation": 8, "window": 1, "sinks": 0}
    assert torch.equal(dense[:, :2], sparse[:, :2])  # t <= window: every key is in the window
    assert not torch.allclose(dense[:, -1], sparse[:, -1])


@pytest.mark.parametrize("pattern", [None, SPARSE[0]], ids=str)
def test_greedy_generate_equals_repeated_forward(pattern) -> None:
    model = tiny_ratplus(kv_pattern=pattern)
    prompt = random_ids(1, 7)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
        seq = prompt
        for _ in range(12):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(generated, seq)


def test_save_load_generate_round_trip(tmp_path: Path) -> None:
    model = tiny_ratplus(kv_pattern=SPARSE[0])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "ratplus"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RatPlusForCausalLM)
    assert loaded.kv_patterns()[0] == KVPattern(dilation=4, window=2, sinks=1)
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        kwargs = {"max_new_tokens": 6, "do_sample": False}
        assert torch.equal(loaded.generate(ids, **kwargs), model.generate(ids, **kwargs))
    dense = RatPlusForCausalLM.from_pretrained(tmp_path, kv_pattern="dense")
    assert dense.config.kv_pattern is None and dense.kv_patterns()[1].dense


def test_training_step_reaches_the_gates() -> None:
    model = tiny_ratplus(kv_pattern=SPARSE[0]).train()
    ids = random_ids(2, 21)
    loss = model(ids, labels=ids).loss
    assert loss is not None and model(ids).cache is None  # no cache in training mode
    loss.backward()
    want = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, want)
    grad = model.model.layers[0].self_attn.forget_gate_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bfloat16_forward_and_decode() -> None:
    model = tiny_ratplus(kv_pattern=SPARSE[0]).to(torch.bfloat16)
    ids = random_ids(1, 12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :8])
        steps = [model(ids[:, t : t + 1], cache=out.cache).logits for t in range(8, 12)]
    assert full.dtype == torch.bfloat16
    assert err_ratio(full[:, 8:].float(), torch.cat(steps, 1).float()) < 2e-2


def test_rejects_padding_and_bad_config() -> None:
    model = tiny_ratplus()
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="RAT\\+ does not support padding"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]))
    with pytest.raises(ValueError, match="attention must be one of ratplus, attention"):
        RatPlusConfig(attention="mamba")
    with pytest.raises(ValueError, match="a per-layer KV pattern list needs 4 entries, got 1"):
        RatPlusConfig(kv_pattern=[None])


def test_decode_through_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's decode step with the (interpreted) Triton kernel in place of the reference."""
    from tests.kernels.helpers import launch_device

    launch_device()
    from tersa.kernels.ratplus_decode.triton import ratplus_decode_triton

    monkeypatch.setattr("tersa.kv.modeling_ratplus.ratplus_decode", ratplus_decode_triton)
    model = tiny_ratplus(kv_pattern=SPARSE[0])
    ids = random_ids(1, 14)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :10])
        steps = [model(ids[:, t : t + 1], cache=out.cache).logits for t in range(10, 14)]
    assert err_ratio(full[:, 10:], torch.cat(steps, 1)) < LOGIT_TOL
