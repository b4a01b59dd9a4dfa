"""W8A8 Triton kernels: per-token int8 activation quantization, then an int8 GEMM.

1. ``_quantize_kernel``: one program per row; a first pass finds ``max|x|``, a second writes the
   int8 codes ``clamp(round(x / s), -128, 127)`` and the float32 scale ``s = max|x| / 127``.
   Divisions are IEEE (``div_rn``) and rounding is half to even, so the codes match
   :func:`~tersa.kernels.w8a8_matmul.reference.quantize_per_token` bit for bit.
2. ``_w8a8_kernel``: int8 x int8 -> int32 ``tl.dot`` over K (exact), then the epilogue
   ``acc · s_x[m] · s_w[n] + bias[n]`` in float32, stored in the activations' dtype.

The codes round-trip through memory (M·K bytes, against the GEMM's M·N·K work): a separate pass is
what makes the per-row scale known before the first K tile of the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tersa.kernels.triton_utils import is_interpreted, m_bucket, swizzle_tile
from tersa.kernels.w8a8_matmul.reference import check_w8a8_args

# One small config for the interpreter: every tile step costs milliseconds on the CPU.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
# Row chunk of the quantization kernel: 4 KiB of fp32 per step, loops over longer rows.
QUANT_BLOCK_MAX = 1024


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# int8 tensor-core tiles: K steps of 128 bytes (one 128-B line per row), the large tiles for
# prefill, 64-row ones for M in the hundreds, a 16-row one for decode.
CONFIGS = [
    _config(128, 256, 128, 8, 3),
    _config(256, 128, 128, 8, 3),
    _config(128, 128, 128, 8, 4),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(16, 64, 256, 4, 4),
]


@triton.jit
def _round_half_even(y):
    """Round float32 ``y`` to the nearest integer, ties to even (``torch.round``); exact."""
    f = tl.floor(y)
    r = y - f  # in [0, 1)
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
    up = (r > 0.5) | ((r == 0.5) & (odd == 1.0))
    return f + up.to(tl.float32)


@triton.jit
def _quantize_kernel(
    x_ptr,  # [M, K] float
    q_ptr,  # [M, K] int8
    s_ptr,  # [M] float32
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    scale = tl.maximum(scale, 1e-10)  # the floor of compute_qparams: an all-zero row stays finite
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + offs, q.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, scale)


@triton.jit
def _w8a8_kernel(
    a_ptr,  # [M, K] int8 activation codes
    b_ptr,  # [N, K] int8 weight codes
    sa_ptr,  # [M] float32 per-token scales
    sb_ptr,  # [N] per-channel scales
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0,
        )  # [BM, BK] int8
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0,
        )  # [BK, BN] int8
        acc = tl.dot(a, b, acc)  # int32, exact

    sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    sb = tl.load(sb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]  # the reference's order of rounding
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


TUNED_KERNEL = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K"])(_w8a8_kernel)


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes of ``x [M, K]``: ``(codes int8 [M, K], scale float32 [M, 1])``."""
    m, k = x.shape
    codes = torch.empty(m, k, device=x.device, dtype=torch.int8)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m > 0:
        block = min(triton.next_power_of_2(max(k, 1)), QUANT_BLOCK_MAX)
        _quantize_kernel[(m,)](x, codes, scale, k, *x.stride(), codes.stride(0), BLOCK_K=block)
    return codes, scale


def int8_scaled_mm_triton(
    codes: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``(codes [M, K] @ weight [N, K]ᵀ) · x_scale [M, 1] · w_scale [N] + bias`` -> ``[M, N]``.

    CUDA tensors use the autotuned configs; CPU tensors run in the interpreter with
    :data:`INTERPRET_CONFIG`, or ``config`` when given.
    """
    (m, k), n = codes.shape, weight.shape[0]
    out = torch.empty(m, n, device=codes.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    if config is None and is_interpreted(codes):
        config = INTERPRET_CONFIG
    args = (
        codes,
        weight,
        x_scale.reshape(-1),
        w_scale.reshape(-1),
        w_scale if bias is None else bias,
        out,
        m,
        n,
        k,
        m_bucket(m),
        *codes.stride(),
        *weight.stride(),
        *out.stride(),
    )

    def grid(c: dict) -> tuple[int]:
        return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)

    if config is not None:
        _w8a8_kernel[grid(config)](*args, HAS_BIAS=bias is not None, **config)
    else:
        TUNED_KERNEL[grid](*args, HAS_BIAS=bias is not None)
    return out


def w8a8_matmul_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton W8A8 matmul: ``x [..., K]`` -> ``[..., N]`` in ``x``'s dtype.

    Arguments as in :func:`tersa.kernels.w8a8_matmul.w8a8_matmul`; ``config`` forces the GEMM tile
    (keys of :data:`INTERPRET_CONFIG`), for tests.
    """
    check_w8a8_args(x, weight, w_scale, bias)
    k, n = x.shape[-1], weight.shape[0]
    codes, x_scale = quantize_per_token_triton(x.reshape(-1, k))
    out = int8_scaled_mm_triton(codes, x_scale, weight, w_scale, bias, x.dtype, config=config)
    return out.reshape(*x.shape[:-1], n)
