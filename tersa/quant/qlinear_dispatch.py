"""Which matmul runs a :class:`~tersa.quant.qlinear.QuantLinear`: a fused kernel or the fake-quant
reference.

Two scheme pairs have kernels that compute exactly what the fake-quant forward defines:

- **W4A16**: 4-bit weights (per group or per channel, either symmetry), float inputs.
  :mod:`tersa.kernels.w4a16_matmul`.
- **W8A8**: 8-bit symmetric per-channel weights, 8-bit symmetric per-token dynamic inputs.
  :mod:`tersa.kernels.w8a8_matmul`: the integer product of the codes is exact, so the result
  differs from the fake-quant one only by float32 rounding (relative RMS ~1e-7 in float32).

Everything else (other bit widths, per-tensor weights, static or asymmetric inputs, W4A8, a float
weight) runs the fake-quant reference, and so does any call that needs autograd through the input
(the Triton kernels have no backward) or a float64 input (the kernels keep float32 scales).

On CUDA tensors with Triton installed the kernels are the Triton ones. Elsewhere the torch paths
run, in float32 whatever the input dtype (never fp16 on CPU): W4A16 dequantizes the layer's cached
int8 codes (faster than unpacking the int32 words on every call), W8A8 quantizes each token to int8
and multiplies the codes exactly (:func:`~tersa.kernels.w8a8_matmul.reference.int_matmul`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from tersa.kernels.dispatch import use_triton
from tersa.kernels.w4a16_matmul.reference import w4a16_matmul_codes
from tersa.kernels.w8a8_matmul.reference import w8a8_matmul_reference
from tersa.quant.scheme import ActivationScheme, WeightScheme

if TYPE_CHECKING:
    from tersa.quant.qlinear import QuantLinear

KernelFamily = Literal["w4a16", "w8a8"]
KernelPath = Literal["fake_quant", "w4a16_torch", "w4a16_triton", "w8a8_torch", "w8a8_triton"]

# Input dtypes the kernels take; float64 stays on the reference, which computes in float64.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_family(
    weights: WeightScheme | None, activations: ActivationScheme | None
) -> KernelFamily | None:
    """The fused matmul that implements a (weights, activations) scheme pair, or None."""
    if weights is None or weights.granularity == "tensor":
        return None
    if weights.bits == 4 and activations is None:
        return "w4a16"
    w8_sym_channel = weights.bits == 8 and weights.symmetric and weights.granularity == "channel"
    a8_sym_token = (
        activations is not None
        and activations.bits == 8
        and activations.symmetric
        and activations.granularity == "token"
    )
    return "w8a8" if w8_sym_channel and a8_sym_token else None


# (family, on Triton) -> path
_PATHS: dict[tuple[KernelFamily, bool], KernelPath] = {
    ("w4a16", False): "w4a16_torch",
    ("w4a16", True): "w4a16_triton",
    ("w8a8", False): "w8a8_torch",
    ("w8a8", True): "w8a8_triton",
}


def select_path(layer: QuantLinear, x: torch.Tensor) -> KernelPath:
    """The path :meth:`QuantLinear.forward` takes for the (smoothed) input ``x [..., in]``."""
    family = kernel_family(layer.weights, layer.activations)
    if family is None or layer._calibrating or x.dtype not in KERNEL_DTYPES:
        return "fake_quant"
    if x.requires_grad and torch.is_grad_enabled():
        return "fake_quant"
    return _PATHS[family, use_triton(x, layer.weight_packed, layer.weight_scale, layer.bias)]


def run_kernel(layer: QuantLinear, x: torch.Tensor, path: KernelPath) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` in ``x``'s dtype through the kernel ``path`` names.

    ``x`` is the smoothed input; the kernels quantize it themselves (W8A8) or not at all (W4A16).
    """
    bias = layer.bias
    if path in ("w4a16_torch", "w4a16_triton"):
        assert layer.weights is not None
        zp = None if layer.weights.symmetric else layer.weight_zero_point
        scale, group_size = layer.weight_scale, layer.group_size
        if path == "w4a16_torch":
            return w4a16_matmul_codes(x, layer._codes(), scale, zp, group_size, bias)
        from tersa.kernels.w4a16_matmul.triton import w4a16_matmul_triton

        return w4a16_matmul_triton(x, layer.weight_packed, scale, zp, group_size, bias)
    if path == "w8a8_torch":
        return w8a8_matmul_reference(x, layer._codes(), layer.weight_scale, bias)
    if path == "w8a8_triton":
        from tersa.kernels.w8a8_matmul.triton import w8a8_matmul_triton

        return w8a8_matmul_triton(x, layer._codes(), layer.weight_scale, bias)
    raise ValueError(f"run_kernel: no kernel for path {path!r}")
