"""Load a tersa export back into a model whose quantized linears keep their packed weights.

The model is built with empty (meta) parameters, the quantized modules are swapped in from the
config's layer table, and the safetensors tensors are assigned in place, so no second copy of the
weights is ever allocated. Every tensor's shape and dtype is checked against what the config says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from tersa.errors import ExportError
from tersa.export.format import (
    CONFIG_FILE,
    QUANT_METHOD,
    SUPPORTED_VERSIONS,
    WEIGHTS_FILE,
)
from tersa.models.load import auto_class
from tersa.quant.norms import BiasedRMSNorm, rms_eps
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import linear_weight, replace_linear
from tersa.quant.smoothed import SmoothedLinear


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict; :class:`ExportError` when it is missing or not JSON."""
    path = folder / CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"'{folder}' has no {CONFIG_FILE}; is it a model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"'{path}' is not valid JSON ({e}); re-export the model") from None


def is_tersa_export(folder: Path) -> bool:
    """Whether ``folder`` holds a tersa-quantized export (config quant_method ``tersa``)."""
    if not (folder / CONFIG_FILE).is_file():
        return False
    qc = read_config(folder).get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def load_export(folder: str | Path) -> nn.Module:
    """Rebuild the compressed causal LM stored in ``folder`` (eval mode, on the CPU)."""
    folder = Path(folder)
    raw = read_config(folder)
    layers = _layer_table(raw.get("quantization_config"), folder)
    config = _build_config(raw, folder)
    dtype = _config_dtype(config)
    auto = auto_class(config.model_type, getattr(config, "architectures", None))
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    for name, spec in layers.items():
        _swap_in(model, name, spec, dtype)
    _add_structure(model, raw.get("quantization_config") or {}, folder)
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    _check_tensors(model, tensors, folder)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    _check_materialized(model, folder)
    return model.eval()


def _layer_table(qc: Any, folder: Path) -> dict[str, dict[str, Any]]:
    if qc is None:
        return {}
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ExportError(
            f"'{folder}' uses quant_method '{method}', not a tersa export; "
            "load it with transformers or the tool that wrote it"
        )
    version = qc.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ExportError(
            f"'{folder}' has tersa format version {version!r}; this tersa reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} — upgrade tersa or re-export"
        )
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise ExportError(f"'{folder}': quantization_config.layers is missing; re-export the model")
    return layers


def _build_config(raw: dict[str, Any], folder: Path) -> PretrainedConfig:
    plain = {k: v for k, v in raw.items() if k != "quantization_config"}
    model_type = plain.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **plain)
    except (ValueError, KeyError) as e:
        raise ExportError(f"'{folder}/{CONFIG_FILE}' is not a usable model config: {e}") from None


def _config_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _swap_in(model: nn.Module, name: str, spec: dict[str, Any], dtype: torch.dtype) -> None:
    try:
        model.get_submodule(name)
        module = QuantLinear.from_scheme_dict(
            spec,
            in_features=int(spec["in_features"]),
            out_features=int(spec["out_features"]),
            bias=bool(spec["bias"]),
            dtype=dtype,
            device="meta",
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"quantized layer '{name}' in the config is invalid: {e}") from None
    replace_linear(model, name, module)


def _add_structure(model: nn.Module, qc: dict[str, Any], folder: Path) -> None:
    """Biases on norms and linears, and smoothed linears, that the transformers config has no flag
    for."""
    try:
        shifts = set(qc.get("smoothed_shifts", []))
        for name in qc.get("smoothed", []):
            linear = model.get_submodule(name)
            out_f, in_f = linear_weight(linear).shape
            smoothed = SmoothedLinear(
                in_f,
                out_f,
                bias=linear.bias is not None,
                shift=name in shifts,
                device="meta",
                dtype=linear_weight(linear).dtype,
            )
            replace_linear(model, name, smoothed)
        for name in qc.get("biased_norms", []):
            norm = model.get_submodule(name)
            parent, _, leaf = name.rpartition(".")
            biased = BiasedRMSNorm(norm.weight.shape[0], eps=rms_eps(norm)).to(norm.weight.dtype)
            setattr(model.get_submodule(parent) if parent else model, leaf, biased)
        for name in qc.get("added_biases", []):
            linear = model.get_submodule(name)
            out = linear_weight(linear).shape[0]
            bias = torch.empty(out, device="meta", dtype=linear_weight(linear).dtype)
            linear.bias = nn.Parameter(bias, requires_grad=False)
    except (AttributeError, TypeError) as e:
        raise ExportError(
            f"'{folder}/{CONFIG_FILE}' names a module this model lacks: {e}"
        ) from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExportError(f"'{path.parent}' has no {WEIGHTS_FILE}; the export is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"'{path}' is not a readable safetensors file ({e}); re-export") from None


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = model.state_dict()
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ExportError(
            f"'{folder}/{WEIGHTS_FILE}' holds tensors the config does not describe: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ExportError(
                f"tensor '{name}' in '{folder}/{WEIGHTS_FILE}' is {tuple(tensor.shape)} "
                f"{tensor.dtype}, the config needs {tuple(want.shape)} {want.dtype}; re-export"
            )


def _check_materialized(model: nn.Module, folder: Path) -> None:
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ExportError(
            f"'{folder}/{WEIGHTS_FILE}' lacks tensors: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the export is incomplete"
        )
