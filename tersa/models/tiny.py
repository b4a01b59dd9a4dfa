"""Random tiny models and an offline byte-level tokenizer, for tests and the CLI demo.

Every family gets hidden 64, 2 layers, 4 heads (2 KV heads for the Llama-like ones, to exercise
GQA), vocab 320 and 256 positions. Llama uses intermediate 176 (not a power of two) and ties its
embeddings like the embedded SmolLM2; the others use 128. Nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from tersa.models.adapters import get_adapter

TINY_VOCAB = 320
TINY_MAX_POSITIONS = 256
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_LLAMA_LIKE = {"num_key_value_heads": 2, "head_dim": 16}
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {**_LLAMA_LIKE, "intermediate_size": 176, "tie_word_embeddings": True},
    "mistral": {**_LLAMA_LIKE, "intermediate_size": 128},
    "qwen2": {**_LLAMA_LIKE, "intermediate_size": 128},
    "qwen3": {**_LLAMA_LIKE, "intermediate_size": 128},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gpt2": {"n_inner": 128},
    "bert": {"intermediate_size": 128},
    # tersa's RAT+ (recurrent blocks; attention="attention" gives its plain-attention twin).
    "ratplus": {**_LLAMA_LIKE, "intermediate_size": 128, "scan_chunk": 4},
}
# Frequent English pairs, so the tokenizer merges a little like a real BPE (Ġ is a leading space).
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"),
    ("o", "n"), ("r", "e"), ("Ġt", "he"), ("e", "n"), ("a", "t"), ("o", "r"),
]  # fmt: skip


def tiny_families() -> list[str]:
    """The families ``tiny_config`` can build, sorted."""
    return sorted(_FAMILIES)


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A random-init config of ``family`` at tiny size; ``overrides`` replace any field."""
    if family not in _FAMILIES:
        raise ValueError(
            f"unknown tiny family {family!r}; choose from {', '.join(tiny_families())}"
        )
    fields: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": TINY_VOCAB,
        "max_position_embeddings": TINY_MAX_POSITIONS,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        **_FAMILIES[family],
        **overrides,
    }
    return AutoConfig.for_model(family, **fields)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random tiny model in fp32 and eval mode.

    Decoders are ``*ForCausalLM``; bert is ``BertForMaskedLM``. The global RNG is left untouched.
    """
    config = tiny_config(family, **overrides)
    auto = AutoModelForCausalLM if get_adapter(config).causal else AutoModelForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer built offline: 3 specials, 256 bytes, 12 merges (271 ids).

    ``<pad>`` = 0, ``<s>`` = 1 (bos), ``</s>`` = 2 (eos); no token is added on encode. Every
    string round-trips through encode/decode.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    byte_chars = _bytes_to_unicode()
    for b in range(256):  # byte b gets id 3 + b
        vocab[byte_chars[b]] = len(vocab)
    for left, right in _MERGES:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    assert len(vocab) <= TINY_VOCAB
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=TINY_MAX_POSITIONS,
    )


def save_tiny_checkpoint(path: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a complete HF folder (config, ``model.safetensors``, tokenizer) and return its path.

    ``AutoModelForCausalLM`` (``AutoModelForMaskedLM`` for bert) and ``AutoTokenizer`` load it
    with ``local_files_only=True``.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed=seed).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out
