"""From text to token tensors: one tokenization, then calibration samples and evaluation windows."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from tersa.errors import DataError


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    """The whole text tokenized once, without special tokens.

    :returns: ids ``[T]``, int64.
    """
    # verbose=False: the text is far longer than model_max_length on purpose (it is cut into windows
    # afterwards), so the tokenizer's "sequence length is longer than..." warning is noise.
    ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)[
        "input_ids"
    ]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(
    ids: torch.LongTensor, samples: int, seq_len: int, seed: int
) -> torch.LongTensor:
    """``samples`` random contiguous slices of ``ids``, each ``seq_len`` long.

    Start offsets come from a ``torch.Generator`` seeded with ``seed``, so the same seed gives the
    same samples on every run and machine. Offsets lie in ``[0, T - seq_len - 1]`` (the GPTQ
    convention), which is why at least ``seq_len + 1`` tokens are needed.

    :param ids: token ids ``[T]``.
    :returns: ``[samples, seq_len]``, int64.
    """
    assert ids.dim() == 1, f"ids must be 1-D, got shape {tuple(ids.shape)}"
    if samples < 1 or seq_len < 1:
        raise DataError(f"samples ({samples}) and seq_len ({seq_len}) must be at least 1")
    T = ids.numel()
    if seq_len >= T:
        raise DataError(
            f"calibration text has {T} tokens; seq_len {seq_len} needs at least {seq_len + 1} — "
            f"lower seq_len or give more text"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    starts = torch.randint(0, T - seq_len, (samples,), generator=gen)  # [S]
    offsets = starts[:, None] + torch.arange(seq_len)  # [S, L]
    return ids.cpu()[offsets]


def eval_windows(
    ids: torch.LongTensor, seq_len: int, max_windows: int | None, spread: bool
) -> torch.LongTensor:
    """Non-overlapping windows of ``seq_len`` tokens for perplexity.

    The text holds ``n = T // seq_len`` windows (the tail is dropped); ``N = min(max_windows, n)``
    of them are used (all ``n`` when ``max_windows`` is None). ``spread=False`` takes the first
    ``N``; ``spread=True`` takes windows ``i * n // N`` for ``i < N``, sampling the whole text.

    :param ids: token ids ``[T]``.
    :returns: ``[N, seq_len]``, int64.
    """
    assert ids.dim() == 1, f"ids must be 1-D, got shape {tuple(ids.shape)}"
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be at least 1 (or unset for all), got {max_windows}")
    T = ids.numel()
    n = T // seq_len
    if n == 0:
        raise DataError(
            f"evaluation text has {T} tokens, fewer than one window of {seq_len}; "
            f"lower seq_len or give more text"
        )
    N = n if max_windows is None else min(max_windows, n)
    index = torch.tensor([i * n // N for i in range(N)]) if spread else torch.arange(N)
    return ids[: n * seq_len].reshape(n, seq_len)[index]
