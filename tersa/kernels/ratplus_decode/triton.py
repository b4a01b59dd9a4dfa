"""RAT+ decode attention Triton kernel: one program per (sequence, query head), online softmax.

A program loads its query once and walks the ``n`` valid cache entries of its KV head in
``BLOCK_N`` steps, keeping the running max, the softmax denominator and the weighted value sum in
fp32 (flash-decoding without the split: at ``n = P + W + 1 + T/D`` entries a head walks a few
blocks). Decode is memory bound, so the dot products are broadcast multiply-and-sum, not
``tl.dot`` (which needs 16 rows; one query has one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tersa.kernels.ratplus_decode.reference import check_decode_args
from tersa.kernels.triton_utils import is_interpreted

# Interpreter tile over cache entries: every step costs milliseconds on the CPU.
INTERPRET_BLOCK_N = 16


@triton.jit
def _ratplus_decode_kernel(
    q_ptr,  # [B, Hq, d]
    k_ptr,  # [B, Hkv, N, d]
    v_ptr,  # [B, Hkv, N, d]
    out_ptr,  # [B, Hq, d]
    n_valid,
    head_dim,
    group,  # Hq // Hkv
    scale,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_od,
    n_q_heads,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_q_heads
    h = pid % n_q_heads
    kv_h = h // group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    # upcast right after loading: the interpreter gets bf16 arithmetic wrong
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * scale
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh

    m_i = tl.full((1,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((1,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, n_valid, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_valid
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=tile_mask,
            other=0.0,
        ).to(tl.float32)  # [BN, BD]
        s = tl.sum(k * q[None, :], axis=1)  # [BN]
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # [1]
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)  # [BN]; zero past n_valid
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=tile_mask,
            other=0.0,
        ).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def launch_config(head_dim: int, interpreted: bool) -> dict[str, int]:
    """Tiles: ``BLOCK_D`` the next power of two of ``head_dim`` (``tl.arange`` needs one);
    ``BLOCK_N`` 64 entries on the GPU (a 64 x 128 fp32 tile stays in registers for 4 warps, not
    yet swept on hardware), :data:`INTERPRET_BLOCK_N` in the interpreter."""
    block_n = INTERPRET_BLOCK_N if interpreted else 64
    return {"BLOCK_N": block_n, "BLOCK_D": triton.next_power_of_2(head_dim)}


def ratplus_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: int,
    scale: float | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton RAT+ decode attention (contract of
    :func:`~tersa.kernels.ratplus_decode.reference.ratplus_decode_reference`).

    CPU tensors run in the Triton interpreter (``TRITON_INTERPRET=1``). ``config`` (``BLOCK_N``,
    ``BLOCK_D``, optionally ``num_warps``) forces one tile shape, for tests.
    """
    check_decode_args(q, k, v, n)
    b, hq, d = q.shape
    out = torch.empty_like(q)
    if b == 0:
        return out
    if config is None:
        config = launch_config(d, is_interpreted(q)) | {"num_warps": 4}
    scale = d**-0.5 if scale is None else scale
    _ratplus_decode_kernel[(b * hq,)](
        *(q, k, v, out, n, d, hq // k.shape[1], scale),
        *(*q.stride(), *k.stride(), *v.stride(), *out.stride()),
        hq,
        **config,
    )
    return out
