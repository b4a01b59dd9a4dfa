"""Write a (compressed) model as a tersa export folder; see :mod:`tersa.export.format`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn

from tersa.export.format import CONFIG_FILE, FORMAT_VERSION, QUANT_METHOD, WEIGHTS_FILE
from tersa.quant.norms import BiasedRMSNorm
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import is_linear
from tersa.quant.smoothed import SmoothedLinear


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (first name wins: embeddings before lm_head)."""
    seen: set[tuple[int, torch.Size, torch.dtype]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (
            tensor.untyped_storage().data_ptr() + tensor.storage_offset(),
            tensor.shape,
            tensor.dtype,
        )
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensor data (what the safetensors file holds besides its header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: LAYER}`` for every :class:`QuantLinear` in the model (see the format doc)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            layers[name] = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
                **module.scheme_dict(),
            }
    return layers


def structural_extras(model: nn.Module) -> dict[str, list[str]]:
    """Modules the transformers config cannot describe, beyond quantized linears.

    ``biased_norms``: RMSNorms that gained a bias (OS+ shift); ``added_biases``: float linears that
    gained a bias the config's architecture does not have; ``smoothed``: float
    :class:`~tersa.quant.smoothed.SmoothedLinear` layers (post-norm outlier transforms), and
    ``smoothed_shifts`` the subset of them with a ``smooth_shift``.
    """
    with init_empty_weights():
        reference = type(model)(model.config)
    ref_keys = set(reference.state_dict())
    norms = [n for n, m in model.named_modules() if isinstance(m, BiasedRMSNorm)]
    biases = [
        n
        for n, m in model.named_modules()
        if is_linear(m) and m.bias is not None and f"{n}.bias" not in ref_keys
    ]
    smoothed = {n: m for n, m in model.named_modules() if isinstance(m, SmoothedLinear)}
    shifts = [n for n, m in smoothed.items() if m.smooth_shift is not None]
    return {
        "biased_norms": norms,
        "added_biases": biases,
        "smoothed": list(smoothed),
        "smoothed_shifts": shifts,
    }


def save_export(model: nn.Module, folder: Path) -> int:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``; returns the tensor bytes
    (equal to ``tensor_bytes(unique_state_dict(model))``)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in unique_state_dict(model).items()}
    save_file(
        tensors,
        folder / WEIGHTS_FILE,
        metadata={"format": "pt", "tersa_version": str(FORMAT_VERSION)},
    )
    config = model.config.to_dict()
    layers = quantized_layers(model)
    extras = {k: v for k, v in structural_extras(model).items() if v}
    config.pop("quantization_config", None)
    if layers or extras:
        # quant_method "tersa" also makes plain transformers refuse the folder instead of
        # silently dropping tensors it has no place for.
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "version": FORMAT_VERSION,
            "layers": layers,
            **extras,
        }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    return tensor_bytes(tensors)
