"""Perplexity of a causal LM over fixed token windows.

Each window ``[L]`` is scored on its ``L - 1`` next-token predictions (the first token has no
context inside the window). The cross-entropy is computed in fp32 from upcast logits and summed in
float64, so the figure does not depend on the batch size or on the model's dtype rounding the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tersa.errors import DataError, ModelError


@dataclass
class PplResult:
    """Perplexity, mean per-token NLL (nats; ``ppl == exp(nll)``), tokens scored, windows used."""

    ppl: float
    nll: float
    tokens: int
    windows: int


def check_seq_len(config: object, seq_len: int) -> None:
    """Raise ``DataError`` when ``seq_len`` exceeds the model's positions.

    The limit is ``max_position_embeddings`` or ``n_positions``; no check when the config has
    neither.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(
        text_config, "n_positions", None
    )
    if limit is not None and seq_len > limit:
        raise DataError(
            f"seq_len {seq_len} exceeds the model's maximum of {limit} positions; lower seq_len"
        )


def check_causal(config: object) -> None:
    """Refuse perplexity for encoders (BERT-style masked LMs have no next-token predictions)."""
    from tersa.models.adapters import get_adapter

    adapter = get_adapter(config)  # type: ignore[arg-type]
    if not adapter.causal:
        raise DataError(
            f"perplexity needs a causal language model; '{adapter.model_type}' is an encoder. "
            "Set 'evaluation: null' in the recipe to compress it without evaluation"
        )


def perplexity(
    model: nn.Module,
    windows: torch.LongTensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PplResult:
    """Perplexity of ``model`` on ``windows``.

    :param model: a causal LM whose forward takes ``input_ids`` and ``use_cache`` and returns
        logits ``[B, L, V]`` (as ``.logits`` or the first output).
    :param windows: token ids ``[W, L]`` with ``L >= 2``.
    :param batch_size: windows per forward; does not change the result.
    :param device: where the windows go; the model's own device when None. The model is not moved.
    :param progress: called as ``progress(done_windows, W)`` after each batch.
    :returns: ``PplResult`` over ``W * (L - 1)`` tokens.
    """
    assert windows.dim() == 2, f"windows must be [W, L], got shape {tuple(windows.shape)}"
    W, L = windows.shape
    if W == 0 or L < 2:
        raise DataError(
            f"perplexity needs at least one window of 2+ tokens, got windows of shape {W}x{L}"
        )
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    _refuse_cpu_fp16(model, device)
    nll_sum = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, W, batch_size):
                batch = windows[start : start + batch_size].to(device)  # [B, L]
                nll_sum += _batch_nll(model, batch).cpu()
                if progress is not None:
                    progress(min(start + batch_size, W), W)
    finally:
        model.train(was_training)
    tokens = W * (L - 1)
    nll = nll_sum.item() / tokens
    return PplResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=W)


def _batch_nll(model: nn.Module, batch: torch.LongTensor) -> torch.Tensor:
    """Summed next-token NLL of ``batch`` ``[B, L]`` as a float64 scalar."""
    head = _plain_head(model)
    if head is None:
        out = model(input_ids=batch, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B, L, V]
        return sum((_nll(logits[b, :-1], batch[b, 1:]) for b in range(batch.shape[0])), _ZERO)
    # Logits for a whole batch are [B, L, V] (805 MB for 8x512 SmolLM2 windows in fp32, and the
    # loss needs another copy); the head runs window by window instead, so evaluation peaks near
    # the model's own size.
    hidden = model.base_model(input_ids=batch, use_cache=False)[0]  # [B, L, H]
    return sum((_nll(head(hidden[b, :-1]), batch[b, 1:]) for b in range(batch.shape[0])), _ZERO)


_ZERO = torch.zeros((), dtype=torch.float64)


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` ``[T, V]`` against ``target`` ``[T]``, in float64."""
    # Upcast so bf16 logits don't round the loss; sum in float64 over thousands of terms.
    nll = F.cross_entropy(logits.float(), target, reduction="none")
    return nll.double().sum().cpu()


def _plain_head(model: nn.Module) -> nn.Module | None:
    """The LM head when logits are exactly ``head(base_model(x)[0])``, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(model, "base_model", model) is model:
        return None
    # Families that scale or cap their logits after the head need the model's own forward.
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    # Hooks on the model's own forward would be skipped by calling base_model: compressed-tensors,
    # for one, decompresses int8 weights in a forward pre-hook of the top-level model.
    if model._forward_pre_hooks or model._forward_hooks:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, nn.Module) else None


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _refuse_cpu_fp16(model: nn.Module, device: torch.device) -> None:
    # fp16 matmuls on CPU run ~400x slower than fp32 (see the style reference), so an fp16 model on
    # CPU would turn a one-minute evaluation into hours; the embedding dtype is the compute dtype.
    if device.type != "cpu":
        return
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without them
        weight = None
    if weight is None:
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype == torch.float16:
        raise ModelError(
            "the model is in float16 on CPU, where float16 runs far slower than float32; "
            "load it in float32 or bfloat16 to evaluate on CPU, or evaluate on a GPU"
        )
