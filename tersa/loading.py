"""Open any model tersa accepts: an embedded name, a Hugging Face folder, a tersa export, or a
trained RAT+ model (``trained:NAME``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tersa.errors import ModelError
from tersa.export.load import is_tersa_export, load_export
from tersa.models.load import load_model


def open_model(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, PreTrainedTokenizerBase, Path]:
    """Load ``spec`` with its tokenizer; tersa exports keep their packed quantized weights.

    ``trained:NAME`` and RAT+ folders (``tersa train`` outputs) load as
    :class:`~tersa.kv.RatPlusForCausalLM` (:func:`tersa.kv.train.load_trained`).
    """
    from tersa.kv.train.trained import TRAINED_PREFIX, is_ratplus_folder, load_trained

    path = Path(spec)
    # An export is checked first: a compressed RAT+ model is also a RAT+ folder, and only
    # load_export keeps tersa's quantized linears (transformers would dequantize them).
    export = not spec.startswith(("embedded:", TRAINED_PREFIX)) and path.is_dir()
    if export and is_tersa_export(path):
        model = load_export(path)
        if dtype != _float_dtype(model):
            model = model.to(dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"'{path}' has no usable tokenizer ({e}); copy it from the source"
            ) from None
        return model, tokenizer, path
    if spec.startswith(TRAINED_PREFIX) or (path.is_dir() and is_ratplus_folder(path)):
        return load_trained(spec, dtype)
    return load_model(spec, dtype=dtype)


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
