"""W4A16 Triton kernel: group-wise dequantization of packed 4-bit weights inside the GEMM.

Each program computes a ``[BLOCK_M, BLOCK_N]`` output tile. Per K step it loads ``BLOCK_K // 8``
int32 words per output column, splits them into 4-bit codes with shifts (``[words, 8, BLOCK_N]``,
reshaped to ``[BLOCK_K, BLOCK_N]``, first code in the lowest bits as ``pack_int32`` writes it),
subtracts the offset 8 and the zero point, multiplies by the group scale and feeds ``tl.dot``.

Decode (M <= 16) splits K across programs (``SPLIT_K``) so that a single row still spreads the
weight read over every SM; partial tiles are summed with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tersa.kernels.triton_utils import dot_dtype, is_interpreted, m_bucket, swizzle_tile
from tersa.kernels.w4a16_matmul.reference import check_w4a16_args

# Rows up to this use the split-K decode configs; more rows fill the GPU with output tiles alone.
DECODE_MAX_M = 16

# One small config for the interpreter: every tile step costs milliseconds on the CPU.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 4}


def _config(bm: int, bn: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Decode is a weight stream: BLOCK_M is the tl.dot minimum (16); BLOCK_N x SPLIT_K trade programs
# against bytes in flight per program (N=4096, BLOCK_N=64, SPLIT_K=4: 256 programs on 132 SMs).
# Both lists are starting points, not yet swept on hardware: bench/kernels.py prints the tuner's pick.
DECODE_CONFIGS = [
    _config(16, 32, 128, 1, 4, 4),
    _config(16, 32, 256, 2, 4, 3),
    _config(16, 64, 128, 2, 4, 4),
    _config(16, 64, 256, 4, 4, 3),
    _config(16, 128, 128, 4, 4, 4),
    _config(16, 32, 128, 4, 4, 4),
    _config(16, 64, 128, 8, 4, 4),
    _config(16, 128, 256, 8, 8, 3),
]
# Prefill is compute bound: the usual Hopper/Ampere bf16 GEMM tiles, plus smaller ones for M ~ 100.
PREFILL_CONFIGS = [
    _config(128, 128, 64, 1, 8, 3),
    _config(128, 256, 64, 1, 8, 3),
    _config(128, 128, 128, 1, 8, 3),
    _config(64, 128, 64, 1, 4, 4),
    _config(128, 64, 64, 1, 4, 4),
    _config(64, 64, 128, 1, 4, 4),
    _config(32, 128, 128, 1, 4, 4),
]
TUNING_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_ZP"]


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K] float
    w_ptr,  # [N, ceil(K/8)] int32, 8 codes per word
    s_ptr,  # [N, G] float
    z_ptr,  # [N, G] int8 (read only when HAS_ZP)
    b_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [M, N]; fp32 and zero-filled when SPLIT_K > 1
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only
    stride_xm,
    stride_xk,
    stride_wn,
    stride_ww,
    stride_sn,
    stride_sg,
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,  # inputs per group; 0: one scale per output channel
    HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n_words = tl.cdiv(K, 8)
    shifts = tl.arange(0, 8) * 4  # bit offset of each code in its word

    if GROUP_SIZE == 0:  # per channel: integer codes in the loop, the scale in the epilogue
        s_ch = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        zq_ch = tl.full((BLOCK_N,), 8, tl.int32)
        if HAS_ZP:
            zq_ch += tl.load(z_ptr + offs_n * stride_sn, mask=n_mask, other=0).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_w = kt * WORDS + tl.arange(0, WORDS)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)  # [BM, BK]; zero past K, so padded codes contribute nothing
        w_mask = (offs_w[:, None] < n_words) & n_mask[None, :]
        words = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_w[:, None] * stride_ww, mask=w_mask, other=0
        )  # [WORDS, BN]
        codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [WORDS, 8, BN], unsigned

        if GROUP_SIZE == 0:
            w = tl.reshape((codes - zq_ch[None, None, :]).to(tl.float32), (BLOCK_K, BLOCK_N))
        elif GROUP_SIZE % 8 == 0:  # the 8 codes of a word share a group: one scale per word
            s_off = offs_n[None, :] * stride_sn + ((offs_w * 8) // GROUP_SIZE)[:, None] * stride_sg
            s = tl.load(s_ptr + s_off, mask=w_mask, other=0.0).to(tl.float32)  # [WORDS, BN]
            zq = tl.full((WORDS, BLOCK_N), 8, tl.int32)
            if HAS_ZP:
                zq += tl.load(z_ptr + s_off, mask=w_mask, other=0).to(tl.int32)
            w3 = (codes - zq[:, None, :]).to(tl.float32) * s[:, None, :]  # [WORDS, 8, BN]
            w = tl.reshape(w3, (BLOCK_K, BLOCK_N))
        else:  # groups split words: one scale per code
            k_mask = (offs_k[:, None] < K) & n_mask[None, :]
            s_off = offs_n[None, :] * stride_sn + (offs_k // GROUP_SIZE)[:, None] * stride_sg
            s = tl.load(s_ptr + s_off, mask=k_mask, other=0.0).to(tl.float32)  # [BK, BN]
            zq = tl.full((BLOCK_K, BLOCK_N), 8, tl.int32)
            if HAS_ZP:
                zq += tl.load(z_ptr + s_off, mask=k_mask, other=0).to(tl.int32)
            w = (tl.reshape(codes, (BLOCK_K, BLOCK_N)) - zq).to(tl.float32) * s
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=PRECISION)

    if GROUP_SIZE == 0:
        acc = acc * s_ch[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = tl.where(pid_k == 0, acc + bias[None, :], acc)  # once, not once per K split
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


# split-K accumulates with atomics: the tuner zeroes the output before each trial and after
DECODE_KERNEL = triton.autotune(DECODE_CONFIGS, key=TUNING_KEY, reset_to_zero=["out_ptr"])(
    _w4a16_kernel
)
PREFILL_KERNEL = triton.autotune(PREFILL_CONFIGS, key=TUNING_KEY)(_w4a16_kernel)


def w4a16_matmul_triton(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton W4A16 matmul: ``x [..., K]`` -> ``[..., N]`` in ``x``'s dtype.

    Arguments as in :func:`tersa.kernels.w4a16_matmul.w4a16_matmul`. CUDA tensors use the
    autotuned configs; CPU tensors run in the Triton interpreter (``TRITON_INTERPRET=1``) with
    :data:`INTERPRET_CONFIG`. ``config`` (keys of :data:`INTERPRET_CONFIG`, optionally
    ``num_warps`` / ``num_stages``) forces one tile shape, for tests.
    """
    check_w4a16_args(x, weight_packed, scale, zero_point, group_size, bias)
    k, n = x.shape[-1], weight_packed.shape[0]
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    if config is None and is_interpreted(x):
        config = INTERPRET_CONFIG
    kernel = DECODE_KERNEL if m <= DECODE_MAX_M else PREFILL_KERNEL
    split = config["SPLIT_K"] > 1 if config is not None else kernel is DECODE_KERNEL
    # split-K sums partial tiles with atomics: an fp32 zero-filled output, cast at the end
    alloc = torch.zeros if split else torch.empty
    out = alloc(m, n, device=x.device, dtype=torch.float32 if split else x.dtype)
    if m > 0 and n > 0:
        # contiguous: the kernel reads the zero point with the scale's strides
        zp = None if zero_point is None else zero_point.contiguous()
        _launch(kernel, config, x2, weight_packed, scale.contiguous(), zp, bias, out, group_size)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _launch(
    kernel: triton.runtime.Autotuner,
    config: dict[str, int] | None,
    x2: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    group_size: int | None,
) -> None:
    """Launch ``kernel`` (autotuned) or, when ``config`` is given, the plain kernel with it."""
    (m, k), n = x2.shape, out.shape[1]
    dot_dt, precision = dot_dtype(x2)
    args = (
        *(x2, weight_packed, scale),
        scale if zero_point is None else zero_point,  # never read without HAS_ZP
        scale if bias is None else bias,  # never read without HAS_BIAS
        out,
        *(m, n, k, m_bucket(m)),
        *(*x2.stride(), *weight_packed.stride(), *scale.stride(), *out.stride()),
    )
    meta = {
        "GROUP_SIZE": group_size or 0,
        "HAS_ZP": zero_point is not None,
        "HAS_BIAS": bias is not None,
        "DOT_DTYPE": dot_dt,
        "PRECISION": precision,
    }

    def grid(c: dict) -> tuple[int, int]:
        return triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"]

    if config is not None:
        _w4a16_kernel[grid(config)](*args, **meta, **config)
    else:
        kernel[grid](*args, **meta)
