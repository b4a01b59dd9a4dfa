"""Write a (compressed) model as a tersa export folder; see :mod:`tersa.export.format`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import save_file
from torch import nn

from tersa.compress.l2.layer import L2Linear
from tersa.compress.lossless import VERSION as LOSSLESS_VERSION
from tersa.compress.lossless import write_container
from tersa.export.format import (
    CONFIG_FILE,
    DENSE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOSSLESS_FILE,
    LOSSLESS_KEY,
    TERSA_KEY,
    TERSA_METHOD,
    WEIGHTS_FILE,
)
from tersa.export.layout import stored_tensors
from tersa.export.qconfig import build_quantization_config, layer_layouts
from tersa.export.structured import place_structured, structured_records
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


def reference_model(model: nn.Module) -> nn.Module:
    """The architecture of ``model`` (from its config) with its structured layers, on the meta
    device: every other module as the config builds it."""
    with init_empty_weights():
        reference = type(model)(model.config)
    place_structured(reference, structured_records(model), "the model being saved")
    return reference


def structural_extras(model: nn.Module, reference: nn.Module) -> dict[str, list[str]]:
    """Modules the transformers config cannot describe, beyond quantized linears.

    ``biased_norms``: RMSNorms that gained a bias (OS+ shift); ``added_biases``: linears (float or
    quantized) that gained a bias the config's architecture does not have; ``smoothed``: float
    :class:`~tersa.quant.smoothed.SmoothedLinear` layers (post-norm outlier transforms), and
    ``smoothed_shifts`` the subset of them with a ``smooth_shift``.
    """
    ref_keys = set(reference.state_dict())
    norms = [n for n, m in model.named_modules() if isinstance(m, BiasedRMSNorm)]
    biases = [
        n
        for n, m in model.named_modules()
        if (is_linear(m) or isinstance(m, QuantLinear | L2Linear))
        and m.bias is not None
        and f"{n}.bias" not in ref_keys
    ]
    smoothed = {n: m for n, m in model.named_modules() if isinstance(m, SmoothedLinear)}
    shifts = [n for n, m in smoothed.items() if m.smooth_shift is not None]
    return {
        "biased_norms": norms,
        "added_biases": biases,
        "smoothed": list(smoothed),
        "smoothed_shifts": shifts,
    }


def export_tensors(model: nn.Module, layouts: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors to store: :func:`unique_state_dict` with each quantized linear ``NAME`` in its
    layout (``layouts[NAME]``, see :mod:`tersa.export.layout`), contiguous and on the CPU."""
    tensors = unique_state_dict(model)
    for name, layout in layouts.items():
        layer = model.get_submodule(name)
        for key in layer.state_dict():
            tensors.pop(f"{name}.{key}", None)
        tensors.update({f"{name}.{k}": v for k, v in stored_tensors(layer, layout).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def lossless_config(model: nn.Module, qc: dict[str, Any] | None) -> dict[str, Any]:
    """``qc`` (or a ``dense`` tersa config when nothing is quantized) marked as stored in the
    lossless container: ``quant_method: tersa`` and ``tersa.lossless``."""
    if qc is None:
        ct = QuantizationConfig(
            config_groups={},
            format=DENSE,
            quantization_status="compressed",
            ignore=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)],
        )
        qc = {**ct.model_dump(mode="json", exclude={"quant_method"})}
        qc[TERSA_KEY] = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    qc["quant_method"] = TERSA_METHOD  # no compressed-tensors loader may look for safetensors
    qc[TERSA_KEY][LOSSLESS_KEY] = {"file": LOSSLESS_FILE, "version": LOSSLESS_VERSION}
    return qc


def save_export(model: nn.Module, folder: Path, lossless: bool = False) -> int:
    """Write ``model.safetensors`` (or, ``lossless``, ``model.tersa``) and ``config.json`` into
    ``folder``; returns the bytes the tensors take on disk (the container's size when lossless).

    See :mod:`tersa.export.format` for the layout.
    """
    reference = reference_model(model)
    qc = build_quantization_config(model, reference, structural_extras(model, reference))
    layouts = layer_layouts(qc) if qc else {}
    tensors = export_tensors(model, layouts)
    metadata = {"format": "pt", "tersa_version": str(FORMAT_VERSION)}
    if lossless:
        qc = lossless_config(model, qc)
        write_container(folder / LOSSLESS_FILE, tensors, metadata)
        size = (folder / LOSSLESS_FILE).stat().st_size
    else:
        save_file(tensors, folder / WEIGHTS_FILE, metadata=metadata)
        size = tensor_bytes(tensors)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if qc:
        config["quantization_config"] = qc
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    return size
