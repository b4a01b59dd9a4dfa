"""Perplexity against a brute-force loop on a tiny random Llama; seq_len checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from tersa.errors import DataError, ModelError
from tersa.eval.ppl import PplResult, check_seq_len, perplexity

VOCAB = 320


def _config(initializer_range: float = 0.02) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        initializer_range=initializer_range,
    )


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # Wider init than the default: sharp logits (ppl ~1200, not ~vocab), so scoring the wrong
    # shift or the wrong tokens would show.
    return LlamaForCausalLM(_config(initializer_range=0.2)).eval()


@pytest.fixture
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (5, 33))  # odd W and L


def _brute_force(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]  # [L, V]
            losses.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    return math.exp(torch.cat(losses).double().mean().item())


def test_matches_brute_force(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    result = perplexity(model, windows, batch_size=2)
    assert result.tokens == 5 * 32 and result.windows == 5
    assert result.ppl == pytest.approx(_brute_force(model, windows), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)


@pytest.mark.parametrize("batch_size", [1, 3, 5, 8])
def test_batch_size_does_not_matter(
    model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int
) -> None:
    reference = perplexity(model, windows, batch_size=2)
    result = perplexity(model, windows, batch_size=batch_size, device="cpu")
    assert result.ppl == pytest.approx(reference.ppl, rel=1e-5)
    assert result.tokens == reference.tokens


def test_uniform_model_has_ppl_vocab_size(windows: torch.Tensor) -> None:
    model = LlamaForCausalLM(_config())
    with torch.no_grad():
        model.lm_head.weight.zero_()
        if model.lm_head.bias is not None:
            model.lm_head.bias.zero_()
    result = perplexity(model, windows)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-4)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-4)


def test_progress_after_each_batch(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    calls: list[tuple[int, int]] = []
    perplexity(model, windows, batch_size=2, progress=lambda done, W: calls.append((done, W)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_training_mode_is_restored(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    model.train()
    try:
        perplexity(model, windows[:1])
        assert model.training
    finally:
        model.eval()


def test_bf16_model_scores_close_to_fp32(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    bf16 = LlamaForCausalLM(_config()).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    result = perplexity(bf16, windows)
    assert isinstance(result, PplResult)
    assert result.ppl == pytest.approx(perplexity(model, windows).ppl, rel=5e-2)


def test_fp16_on_cpu_is_refused(windows: torch.Tensor) -> None:
    fp16 = LlamaForCausalLM(_config()).to(torch.float16)
    with pytest.raises(ModelError) as e:
        perplexity(fp16, windows)
    assert str(e.value) == (
        "the model is in float16 on CPU, where float16 runs far slower than float32; "
        "load it in float32 or bfloat16 to evaluate on CPU, or evaluate on a GPU"
    )


def test_windows_too_short(model: LlamaForCausalLM) -> None:
    with pytest.raises(DataError) as e:
        perplexity(model, torch.zeros(3, 1, dtype=torch.long))
    assert str(e.value) == (
        "perplexity needs at least one window of 2+ tokens, got windows of shape 3x1"
    )


def test_check_seq_len() -> None:
    check_seq_len(_config(), 256)
    with pytest.raises(DataError) as e:
        check_seq_len(_config(), 4096)
    assert str(e.value) == (
        "seq_len 4096 exceeds the model's maximum of 256 positions; lower seq_len"
    )


def test_check_seq_len_n_positions() -> None:
    with pytest.raises(DataError) as e:
        check_seq_len(GPT2Config(n_positions=2048), 4096)
    assert str(e.value) == (
        "seq_len 4096 exceeds the model's maximum of 2048 positions; lower seq_len"
    )


def test_check_seq_len_without_a_limit() -> None:
    check_seq_len(object(), 10**6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "opt", "gpt2"])
def test_window_by_window_head_matches_the_full_forward(family: str) -> None:
    from tersa.models.tiny import tiny_model

    model = tiny_model(family)
    windows = torch.randint(0, 300, (3, 21))
    got = perplexity(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    assert got.nll == pytest.approx(ref.item(), rel=1e-6)


def test_hooks_on_the_model_run(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    """A forward pre-hook on the top-level model (compressed-tensors decompresses int8 weights in
    one) must run: perplexity then takes the model's own forward, not base_model + head."""
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with_hook = perplexity(model, windows, batch_size=2).ppl
    finally:
        handle.remove()
    assert calls and with_hook == pytest.approx(
        perplexity(model, windows, batch_size=2).ppl, rel=1e-6
    )
