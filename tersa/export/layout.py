"""A quantized layer's tensors as an export stores them, and back to tersa's in-memory layout.

:class:`~tersa.quant.qlinear.QuantLinear` keeps ``weight_packed`` with ``32 // bits`` codes per int32
word, scales ``[1, 1]`` / ``[out, 1]`` / ``[out, G]`` and int8 zero points of the scale's shape.
compressed-tensors (see :mod:`tersa.export.format`) packs densely, stores ``weight_shape``, packs
asymmetric zero points along the output dimension and keeps per-tensor scales as ``[1]``;
``int-quantized`` stores int8 codes unpacked. For 2, 4 and 8 bits the dense packing is bit for bit
tersa's, so those weights are written and read without conversion.

Loading stages a layer first (:func:`stage`: empty meta tensors of the stored shapes, so the stored
tensors can be checked and assigned as they are), then converts it in place (:func:`unstage`).
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from tersa.export.format import DENSE, INT_QUANTIZED, NATIVE, PACK_QUANTIZED
from tersa.quant.primitives import pack_int32, unpack_int32
from tersa.quant.qlinear import QuantLinear

TensorSpec = tuple[tuple[int, ...], torch.dtype]
_WEIGHT_NAMES = ("weight_packed", "weight_scale", "weight_zero_point")


def _same_packing(bits: int) -> bool:
    # Dense packing puts code i at bit i·bits; with 32 % bits == 0 no code crosses a word, which
    # is tersa's "32 // bits codes per word, low bits first".
    return 32 % bits == 0


def _packs_zero_point(layer: QuantLinear, layout: str) -> bool:
    w = layer.weights
    return (
        layout == PACK_QUANTIZED and w is not None and not w.symmetric and w.granularity != "tensor"
    )


def stored_specs(layer: QuantLinear, layout: str) -> dict[str, TensorSpec]:
    """Shape and dtype of every tensor ``layer`` stores in ``layout`` (names local to the layer)."""
    specs = {n: (tuple(t.shape), t.dtype) for n, t in layer.state_dict().items()}
    w = layer.weights
    if layout in (NATIVE, DENSE) or w is None:
        return specs
    out_f, in_f = layer.out_features, layer.in_features
    del specs["weight_packed"]
    if layout == INT_QUANTIZED:
        specs["weight"] = ((out_f, in_f), torch.int8)
    else:
        specs["weight_packed"] = ((out_f, math.ceil(in_f * w.bits / 32)), torch.int32)
        specs["weight_shape"] = ((2,), torch.int64)
    if w.granularity == "tensor":
        specs["weight_scale"] = ((1,), specs["weight_scale"][1])
        if not w.symmetric:
            specs["weight_zero_point"] = ((1,), torch.int8)
    elif _packs_zero_point(layer, layout):
        groups = specs["weight_zero_point"][0][1]
        specs["weight_zero_point"] = ((math.ceil(out_f * w.bits / 32), groups), torch.int32)
    return specs


def stored_tensors(layer: QuantLinear, layout: str) -> dict[str, torch.Tensor]:
    """``layer``'s state dict converted to ``layout``, with the names and shapes of
    :func:`stored_specs`."""
    tensors = dict(layer.state_dict())
    w = layer.weights
    if layout in (NATIVE, DENSE) or w is None:
        return tensors
    out_f, in_f = layer.out_features, layer.in_features
    packed = tensors.pop("weight_packed")
    if layout == INT_QUANTIZED:
        tensors["weight"] = unpack_int32(packed, w.bits, in_f)
    else:
        if not _same_packing(w.bits):
            packed = pack_to_int32(unpack_int32(packed, w.bits, in_f), w.bits)
        tensors["weight_packed"] = packed
        tensors["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    if w.granularity == "tensor":
        tensors["weight_scale"] = tensors["weight_scale"].reshape(1)
        if not w.symmetric:
            tensors["weight_zero_point"] = tensors["weight_zero_point"].reshape(1)
    elif _packs_zero_point(layer, layout):
        tensors["weight_zero_point"] = pack_to_int32(
            tensors["weight_zero_point"], w.bits, packed_dim=0
        )
    return tensors


def stage(layer: QuantLinear, layout: str) -> None:
    """Give a meta-device ``layer`` empty tensors of the stored layout, ready to be assigned."""
    if layout in (NATIVE, DENSE) or layer.weights is None:
        return
    specs = stored_specs(layer, layout)
    for name in _WEIGHT_NAMES:
        if name not in specs and hasattr(layer, name):
            delattr(layer, name)
    for name, (shape, dtype) in specs.items():
        current = getattr(layer, name, None)
        if current is None or tuple(current.shape) != shape or current.dtype != dtype:
            layer.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))


def unstage(layer: QuantLinear, layout: str) -> None:
    """Convert a staged, loaded ``layer`` to tersa's in-memory layout.

    ``ValueError`` when the tensors contradict the scheme (``weight_shape`` not ``[out, in]``,
    codes outside the bit range).
    """
    w = layer.weights
    if layout not in (NATIVE, DENSE) and w is not None:
        out_f, in_f = layer.out_features, layer.in_features
        if layout == INT_QUANTIZED:
            codes = layer.weight
            delattr(layer, "weight")
            layer.register_buffer("weight_packed", pack_int32(codes, w.bits))
        else:
            _check_weight_shape(layer)
            if not _same_packing(w.bits):
                codes = unpack_from_int32(layer.weight_packed, w.bits, torch.Size((out_f, in_f)))
                layer.weight_packed = pack_int32(codes, w.bits)
        if w.granularity == "tensor":
            layer.weight_scale = layer.weight_scale.reshape(1, 1)
            if not w.symmetric:
                layer.weight_zero_point = layer.weight_zero_point.reshape(1, 1)
        elif _packs_zero_point(layer, layout):
            shape = torch.Size((out_f, layer.weight_scale.shape[1]))
            zp = unpack_from_int32(layer.weight_zero_point, w.bits, shape, packed_dim=0)
            layer.weight_zero_point = zp
    if layer.is_static:
        # The stored input scale is the calibration; say so (transformers assigns tensors
        # without load_state_dict, which is where QuantLinear otherwise learns it).
        assert layer.activations is not None
        zp = None if layer.activations.symmetric else layer.input_zero_point
        layer.set_input_qparams(layer.input_scale, zp)


def _check_weight_shape(layer: QuantLinear) -> None:
    got = tuple(int(v) for v in layer.weight_shape.tolist())
    if got != (layer.out_features, layer.in_features):
        raise ValueError(
            f"weight_shape is {list(got)}, the layer is [{layer.out_features}, {layer.in_features}]"
        )
    delattr(layer, "weight_shape")
