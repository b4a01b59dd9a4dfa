"""Block-diagonal matmul Triton kernel: one small GEMM per diagonal block, all in one launch.

The grid is (token tiles, blocks, output tiles of a block). A program computes a
``[BLOCK_M, BLOCK_N]`` tile of output block ``b``: it walks block ``b``'s ``bi`` inputs in
``BLOCK_K`` steps, so it reads only the ``[bo, bi]`` weight of its block and the matching slice of
the activations. Masks cover ``M``, ``bo`` and ``bi`` that are not multiples of the tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tersa.kernels.block_diag_matmul.reference import check_block_diag_args
from tersa.kernels.triton_utils import dot_dtype, is_interpreted

# The smallest tile tl.dot accepts on every dimension.
MIN_TILE = 16
# Interpreter tiles: every tile step costs milliseconds on the CPU, and test shapes are tiny.
INTERPRET_MAX_TILE = 32


@triton.jit
def _block_diag_kernel(
    x_ptr,  # [M, nb*bi] float
    w_ptr,  # [nb, bo, bi] float
    out_ptr,  # [M, nb*bo]
    M,
    BO,
    BI,
    stride_xm,
    stride_xk,
    stride_wb,
    stride_wo,
    stride_wi,
    stride_om,
    stride_on,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output feature within the block
    m_mask = offs_m < M
    n_mask = offs_n < BO
    x_base = x_ptr + blk * BI * stride_xk  # this block's inputs
    w_base = w_ptr + blk * stride_wb

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, BI, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < BI
        # upcast right after loading: the interpreter gets bf16 arithmetic wrong
        x = tl.load(
            x_base + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BM, BK]; zero past bi, so the padded weights add nothing
        w = tl.load(
            w_base + offs_n[None, :] * stride_wo + offs_k[:, None] * stride_wi,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BK, BN] = w[blk, n, k] transposed
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=PRECISION)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + (blk * BO + offs_n)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def launch_config(m: int, bo: int, bi: int, interpreted: bool) -> dict[str, int]:
    """Tile sizes for ``m`` tokens and ``[bo, bi]`` blocks (not yet swept on hardware).

    Each tile is the next power of two of its dimension, between :data:`MIN_TILE` and a cap:
    BLOCK_M 64 (decode, m <= 16, stays at 16 so a single token does not pad to a large tile),
    BLOCK_N 128 and BLOCK_K 64 (a 128 x 64 bf16 weight tile is 16 KiB: three pipeline stages fit in
    shared memory next to the activations). The interpreter caps all three at
    :data:`INTERPRET_MAX_TILE`.
    """
    cap_m, cap_n, cap_k = (INTERPRET_MAX_TILE,) * 3 if interpreted else (64, 128, 64)

    def tile(n: int, cap: int) -> int:
        return max(MIN_TILE, min(triton.next_power_of_2(max(n, 1)), cap))

    return {"BLOCK_M": tile(m, cap_m), "BLOCK_N": tile(bo, cap_n), "BLOCK_K": tile(bi, cap_k)}


def block_diag_matmul_triton(
    x: torch.Tensor, w: torch.Tensor, *, config: dict[str, int] | None = None
) -> torch.Tensor:
    """Triton block-diagonal matmul: ``x [..., nb*bi]``, ``w [nb, bo, bi]`` -> ``[..., nb*bo]``.

    Output in ``x``'s dtype, accumulated in fp32. CPU tensors run in the Triton interpreter
    (``TRITON_INTERPRET=1``). ``config`` (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, optionally
    ``num_warps`` / ``num_stages``) forces one tile shape, for tests; by default
    :func:`launch_config` picks it.
    """
    check_block_diag_args(x, w)
    nb, bo, bi = w.shape
    x2 = x.reshape(-1, nb * bi)  # [M, nb*bi]
    m = x2.shape[0]
    out = torch.empty(m, nb * bo, device=x.device, dtype=x.dtype)
    if m == 0 or out.shape[1] == 0 or bi == 0:
        return out.zero_().reshape(*x.shape[:-1], nb * bo)
    if config is None:
        config = launch_config(m, bo, bi, is_interpreted(x))
        config |= {"num_warps": 4, "num_stages": 3}
    dot_dt, precision = dot_dtype(x2)
    grid = (triton.cdiv(m, config["BLOCK_M"]), nb, triton.cdiv(bo, config["BLOCK_N"]))
    _block_diag_kernel[grid](
        *(x2, w, out, m, bo, bi),
        *(*x2.stride(), *w.stride(), *out.stride()),
        DOT_DTYPE=dot_dt,
        PRECISION=precision,
        **config,
    )
    return out.reshape(*x.shape[:-1], nb * bo)
