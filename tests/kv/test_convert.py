"""Converting a tiny random Llama: the converted model computes what the Llama computes."""

from __future__ import annotations

import pytest
import torch

from tersa.eval.numerics import err_ratio
from tersa.kv import RatPlusForCausalLM, llama_to_ratplus
from tersa.models.tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")  # hidden 64, 2 layers, 4 heads over 2 KV heads, tied embeddings


def ids(length: int = 40) -> torch.Tensor:
    return torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(3))


def test_default_gates_match_llama_closely(llama) -> None:
    model = llama_to_ratplus(llama)
    assert isinstance(model, RatPlusForCausalLM) and model.config.tie_word_embeddings
    attn = model.model.layers[1].self_attn
    assert not attn.forget_gate_proj.weight.any() and torch.all(attn.forget_gate_proj.bias == -6)
    with torch.no_grad():
        want, got = llama(ids()).logits, model(ids()).logits
    # g = σ(-6) ≈ 0.0025 mixes 0.25 % of the previous key/value in: measured 4e-4
    assert err_ratio(want, got) < 2e-3
    assert torch.equal(want.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("output_gate_bias", [0.0, 4.0])
def test_closed_forget_gate_is_exactly_llama(llama, output_gate_bias: float) -> None:
    # σ(-30) = 1e-13: 1 - g rounds to 1 in fp32; the output gate is compensated in o_proj
    model = llama_to_ratplus(llama, forget_gate_bias=-30.0, output_gate_bias=output_gate_bias)
    with torch.no_grad():
        assert err_ratio(llama(ids()).logits, model(ids()).logits) < 1e-6
        prompt = ids(6)[:1]
        kwargs = {"max_new_tokens": 5, "do_sample": False}
        assert torch.equal(model.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))


def test_shares_no_storage_with_the_llama(llama) -> None:
    model = llama_to_ratplus(llama, kv_pattern={"dilation": 8})
    assert model.kv_patterns()[0].dilation == 8
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(
        model.model.layers[0].mlp.up_proj.weight, llama.model.layers[0].mlp.up_proj.weight
    )


def test_rejects_other_families() -> None:
    with pytest.raises(
        ValueError, match="cannot convert model_type 'opt'; supported: llama, mistral"
    ):
        llama_to_ratplus(tiny_model("opt"))
