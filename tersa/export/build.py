"""Shape a meta-device model skeleton into an export's model, then finish it once tensors are in.

:func:`place_modules` swaps in what an :class:`~tersa.export.qconfig.ExportPlan` names (structured
layers, quantized linears staged in their stored layout, biased norms, added biases, smoothed
linears); the caller
checks the stored tensors against the skeleton (:func:`check_tensor_specs`) and assigns them;
:func:`finish_modules` converts each quantized linear to tersa's in-memory layout. Used by
:func:`tersa.export.load.load_export` and by the transformers quantizer alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from compressed_tensors.utils.match import match_named_modules
from safetensors import SafetensorError, safe_open
from torch import nn

from tersa.errors import ExportError
from tersa.export.format import NATIVE
from tersa.export.l2 import place_l2
from tersa.export.layout import TensorSpec, stage, unstage
from tersa.export.qconfig import ExportPlan, Group
from tersa.export.structured import place_structured
from tersa.quant.norms import BiasedRMSNorm, rms_eps
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import linear_weight, replace_linear
from tersa.quant.smoothed import SmoothedLinear

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def place_modules(model: nn.Module, plan: ExportPlan, where: str) -> dict[str, str]:
    """Swap the plan's modules into ``model`` (built on the meta device).

    Structured layers go first: quantized factors are named inside them. L2 layers go after
    the added biases (an L2 layer keeps its linear's bias).

    :returns: ``{name: layout}`` of every quantized linear placed, for :func:`finish_modules`.
    """
    place_structured(model, plan.structured, where)
    matched = _match_groups(model, plan, where)
    unknown = sorted(set(plan.smooth) - set(matched) - set(plan.native))
    if unknown:
        raise ExportError(f"'{where}': tersa.smooth names layers that are not quantized: {unknown}")
    _add_structure(model, plan.extras, where)
    place_l2(model, plan.l2, where)
    placed: dict[str, str] = {}
    for name, group in matched.items():
        _swap_group_layer(model, name, group, plan.smooth.get(name))
        placed[name] = group.layout
    for name, record in plan.native.items():
        _swap_native_layer(model, name, {**record, "smooth": plan.smooth.get(name)}, where)
        placed[name] = NATIVE
    return placed


def finish_modules(model: nn.Module, placed: Mapping[str, str], where: str) -> None:
    """Convert the loaded quantized linears from their stored layout to tersa's."""
    for name, layout in placed.items():
        try:
            unstage(model.get_submodule(name), layout)
        except ValueError as e:
            raise ExportError(f"layer '{name}' in '{where}' is inconsistent: {e}") from None


def _match_groups(model: nn.Module, plan: ExportPlan, where: str) -> dict[str, Group]:
    """``{layer name: group}`` by compressed-tensors' own target matching (names, ``re:``
    patterns, class names; minus ``ignore``)."""
    names = {n for n, _ in model.named_modules()}
    classes = {c.__name__ for m in model.modules() for c in type(m).__mro__}
    matched: dict[str, Group] = {}
    for group in plan.groups:
        for target in group.scheme.targets:
            if not target.startswith("re:") and target not in names | classes:
                raise ExportError(
                    f"'{where}': config group '{group.name}' targets '{target}', which this "
                    f"{type(model).__name__} does not have"
                )
        for name, module in match_named_modules(model, group.scheme.targets, plan.ignore):
            if name in matched:
                raise ExportError(f"'{where}': layer '{name}' is in two config groups")
            if not isinstance(module, nn.Linear):
                raise ExportError(
                    f"'{where}': config group '{group.name}' targets '{name}', a "
                    f"{type(module).__name__}; compressed-tensors layers must be nn.Linear"
                )
            matched[name] = group
    return matched


def _swap_group_layer(model: nn.Module, name: str, group: Group, smooth: str | None) -> None:
    linear = model.get_submodule(name)
    weight = linear_weight(linear)
    out_f, in_f = weight.shape
    layer = QuantLinear(
        in_f,
        out_f,
        bias=linear.bias is not None,
        weights=group.weights,
        activations=group.activations,
        dtype=weight.dtype,
        device="meta",
        smooth=smooth,
    )
    stage(layer, group.layout)
    replace_linear(model, name, layer)


def _swap_native_layer(model: nn.Module, name: str, record: dict, where: str) -> None:
    try:
        dtype = linear_weight(model.get_submodule(name)).dtype
        layer = QuantLinear.from_scheme_dict(
            record,
            in_features=int(record["in_features"]),
            out_features=int(record["out_features"]),
            bias=bool(record["bias"]),
            dtype=dtype,
            device="meta",
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"quantized layer '{name}' in the config is invalid: {e}") from None
    replace_linear(model, name, layer)


def _add_structure(model: nn.Module, extras: Mapping[str, list[str]], where: str) -> None:
    """Biases on norms and linears, and smoothed linears, that the transformers config has no flag
    for."""
    try:
        shifts = set(extras.get("smoothed_shifts", []))
        for name in extras.get("smoothed", []):
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
        for name in extras.get("biased_norms", []):
            norm = model.get_submodule(name)
            parent, _, leaf = name.rpartition(".")
            biased = BiasedRMSNorm(norm.weight.shape[0], eps=rms_eps(norm))
            biased = biased.to(device=norm.weight.device, dtype=norm.weight.dtype)
            setattr(model.get_submodule(parent) if parent else model, leaf, biased)
        for name in extras.get("added_biases", []):
            linear = model.get_submodule(name)
            weight = linear_weight(linear)
            bias = torch.empty(weight.shape[0], device="meta", dtype=weight.dtype)
            linear.bias = nn.Parameter(bias, requires_grad=False)
    except (AttributeError, TypeError) as e:
        raise ExportError(f"'{where}' names a module this model lacks: {e}") from None


# ----------------------------------------------------------------------------------------- checks


def tensor_specs(module: nn.Module, prefix: str = "") -> dict[str, TensorSpec]:
    """``{prefix + name: (shape, dtype)}`` of ``module``'s state dict (meta tensors are fine)."""
    return {prefix + n: (tuple(t.shape), t.dtype) for n, t in module.state_dict().items()}


def header_specs(path: Path) -> dict[str, TensorSpec]:
    """Shapes and dtypes of a safetensors file's tensors, from its header (no tensor data)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k: (tuple(f.get_slice(k).get_shape()), _dtype(f.get_slice(k).get_dtype()))
                for k in f.keys()  # noqa: SIM118 (safe_open has no iter)
            }
    except (SafetensorError, OSError) as e:
        raise ExportError(f"'{path}' is not a readable safetensors file ({e}); re-export") from None


def _dtype(name: str) -> torch.dtype | str:
    return _SAFETENSORS_DTYPES.get(name, name)


def check_tensor_specs(
    expected: Mapping[str, TensorSpec],
    stored: Mapping[str, TensorSpec],
    file: str,
    float_cast: bool = False,
) -> None:
    """Every stored tensor ``expected`` names has the expected shape and dtype.

    :param float_cast: accept any float dtype for a float tensor (transformers casts floats to the
        dtype asked of ``from_pretrained``); integer tensors must match exactly.
    """
    for name, (shape, dtype) in stored.items():
        if name not in expected:
            continue
        want_shape, want_dtype = expected[name]
        same_dtype = dtype == want_dtype or (
            float_cast
            and isinstance(dtype, torch.dtype)
            and dtype.is_floating_point
            and want_dtype.is_floating_point
        )
        if shape != want_shape or not same_dtype:
            raise ExportError(
                f"tensor '{name}' in '{file}' is {shape} {dtype}, the config needs "
                f"{want_shape} {want_dtype}; re-export"
            )
