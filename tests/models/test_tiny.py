from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tersa.models.adapters import get_adapter
from tersa.models.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TINY_VOCAB,
    save_tiny_checkpoint,
    tiny_config,
    tiny_families,
    tiny_model,
    tiny_tokenizer,
)

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


@pytest.mark.parametrize("family", tiny_families())
def test_tiny_config_sizes(family: str) -> None:
    config = tiny_config(family)
    assert config.model_type == family
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.vocab_size == TINY_VOCAB
    assert config.max_position_embeddings == 256
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    if family in LLAMA_LIKE:
        assert config.num_key_value_heads == 2
        assert config.intermediate_size == (176 if family == "llama" else 128)


def test_tiny_config_overrides_and_unknown_family() -> None:
    assert tiny_config("opt", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="unknown tiny family 't5'; choose from bert, gpt2, llama"):
        tiny_config("t5")


@pytest.mark.parametrize("family", tiny_families())
def test_tiny_model_runs(family: str) -> None:
    model = tiny_model(family)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert get_adapter(model).causal == (family != "bert")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 63, 200]])).logits
    assert logits.shape == (1, 4, TINY_VOCAB)
    assert torch.isfinite(logits).all()


def test_tiny_model_seed_is_deterministic_and_local() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_tiny_llama_ties_embeddings_like_smollm2() -> None:
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_tokenizer() -> None:
    tok = tiny_tokenizer()
    assert len(tok) == 271 <= TINY_VOCAB
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    text = "Hello there, the world! ünïcødé 🙂\n\ttabs"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # the merges fire
    assert tok("A")["input_ids"] == [3 + ord("A")]  # byte b is id 3 + b, no bos added
    assert tok.decode([BOS_ID, 3 + ord("x"), EOS_ID], skip_special_tokens=True) == "x"


def test_save_tiny_checkpoint_loads_offline(tmp_path: Path) -> None:
    folder = save_tiny_checkpoint(tmp_path / "ckpt", family="llama", seed=3)
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ref = tiny_model("llama", seed=3)
    ids = tok("the cat sat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert tok.eos_token_id == EOS_ID
