"""W8A8 matmul in pure torch: the spec of the Triton kernels, their test oracle and the CPU path.

Activations are quantized per token (row) on the fly, symmetric int8 with a float32 scale, exactly
as :func:`~tersa.quant.primitives.fake_quantize_per_token` does; the weight holds symmetric int8
codes with one scale per output channel. The product of the codes is exact integer arithmetic;
only the epilogue ``acc · s_x · s_w + bias`` rounds (float32).
"""

from __future__ import annotations

import torch

from tersa.quant.primitives import compute_qparams, quantize

BITS = 8


def check_w8a8_args(
    x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise ``ValueError`` naming the first argument whose shape or dtype does not fit."""
    if x.dim() < 1 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must be int8 codes [N, K] with K={x.shape[-1]}, got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )
    n = weight.shape[0]
    if w_scale.numel() != n or tuple(w_scale.shape) not in ((n,), (n, 1)):
        raise ValueError(f"w_scale must be [N] or [N, 1] with N={n}, got {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x [M, K]`` per row: ``(codes int8 [M, K], scale float32 [M, 1])``.

    ``s = max|x| / 127`` (never below a tiny floor), ``q = clamp(round(x / s), -128, 127)`` with
    round half to even, all in float32.
    """
    xf = x.to(torch.float32)
    scale, _ = compute_qparams(
        xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), BITS, True, torch.float32
    )
    return quantize(xf, scale, None, BITS), scale


# Rows of K per float32 GEMM on CPU: every partial sum of int8 products is an integer of magnitude
# at most K · 2^14, exact in float32 while that stays <= 2^24.
EXACT_FP32_K = 1 << 10


def _int_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether cuBLAS ``torch._int_mm(a [M, K], b [K, N])`` accepts the shapes (M > 16, K, N % 8).

    The CPU ``_int_mm`` accepts any shape but is not used: without VNNI it ran 30-40x slower than a
    float32 GEMM of the same shape (2048³: 11.7 s against 0.32 s on an EPYC test machine; 576 x 512
    x 576: 140 ms against 6 ms), and at M = 1 it was still ~2x slower than the float32 GEMM below.
    """
    m, k = a.shape
    return a.is_cuda and m > 16 and k % 8 == 0 and b.shape[1] % 8 == 0


def _cpu_fp32_gemm_is_ieee() -> bool:
    """False when a reduced-precision setting (``"medium"``: bf16, ``tf32``) may round fp32 GEMMs."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch before the per-backend precision API
        return torch.get_float32_matmul_precision() == "highest"
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision in ("none", "ieee")


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] @ b [N, K]ᵀ`` of int8 codes -> int32 ``[M, N]``.

    ``torch._int_mm`` on CUDA where it applies. On CPU, float32 GEMMs over K slices of at most
    :data:`EXACT_FP32_K`, each exact, summed in int32: half the time of a float64 GEMM. Elsewhere
    (or when a reduced-precision fp32 matmul setting is on) a float64 GEMM, exact because every
    partial sum is an integer below ``K · 2^14 < 2^53``.
    """
    if _int_mm_applies(a, b.t()):
        return torch._int_mm(a, b.t())
    if a.device.type == "cpu" and _cpu_fp32_gemm_is_ieee():
        acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32)  # [M, N]
        for k0 in range(0, a.shape[1], EXACT_FP32_K):
            ks = slice(k0, k0 + EXACT_FP32_K)
            acc += (a[:, ks].float() @ b[:, ks].float().t()).to(torch.int32)
        return acc
    return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)


def scale_epilogue(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``acc [M, N] · x_scale [M, 1] · w_scale [N] + bias [N]`` in float32, returned in ``dtype``."""
    out = acc.to(torch.float32) * x_scale.reshape(-1, 1).to(torch.float32)
    out = out * w_scale.reshape(1, -1).to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(dtype)


def w8a8_matmul_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``x [..., K]`` per token, integer GEMM with ``weight [N, K]``, scale epilogue.

    Returns ``[..., N]`` in ``x``'s dtype. Arguments as in
    :func:`tersa.kernels.w8a8_matmul.w8a8_matmul`.
    """
    check_w8a8_args(x, weight, w_scale, bias)
    k, n = x.shape[-1], weight.shape[0]
    codes, x_scale = quantize_per_token(x.reshape(-1, k))  # [M, K] int8, [M, 1] float32
    out = scale_epilogue(int_matmul(codes, weight), x_scale, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)
