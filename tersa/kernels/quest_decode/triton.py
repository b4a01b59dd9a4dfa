"""Quest Triton kernels: page scoring and sparse decode attention over the selected pages.

Scoring: one program per (sequence, query head, tile of ``BLOCK_P`` pages) reads the page bounds of
its KV head and writes ``Σ_i max(q_i·m_i, q_i·M_i)`` per page. The query heads of one group read
the same bounds; they are ``2·P·d`` floats per KV head, which stay in L2 between them.

Decode: one program per (sequence, query head) walks its ``k`` selected pages, each in
``BLOCK_N``-row steps masked past ``length``, with the running max, the softmax denominator and the
weighted value sum in fp32 (the online softmax of the RAT+ decode kernel, over gathered pages).
Decode is memory bound and one query is one row, so dot products are broadcast multiply-and-sum,
not ``tl.dot`` (which needs 16 rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tersa.kernels.quest_decode.reference import check_decode_args, check_scores_args
from tersa.kernels.triton_utils import is_interpreted

# Interpreter tile over pages: every program costs milliseconds on the CPU, so few and wide.
INTERPRET_BLOCK_P = 32


@triton.jit
def _quest_scores_kernel(
    q_ptr,  # [B, Hq, d]
    lo_ptr,  # [B, Hkv, P, d]
    hi_ptr,  # [B, Hkv, P, d]
    out_ptr,  # [B, Hq, P] fp32
    n_pages,
    head_dim,
    group,  # Hq // Hkv
    stride_qb,
    stride_qh,
    stride_qd,
    stride_lb,
    stride_lh,
    stride_lp,
    stride_ld,
    stride_hb,
    stride_hh,
    stride_hp,
    stride_hd,
    stride_ob,
    stride_oh,
    stride_op,
    n_q_heads,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_q_heads
    h = pid % n_q_heads
    kv_h = h // group
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    p_mask = offs_p < n_pages
    tile_mask = p_mask[:, None] & d_mask[None, :]
    # upcast right after loading: the interpreter gets bf16 arithmetic wrong
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
    q = q.to(tl.float32)
    lo = tl.load(
        lo_ptr
        + b * stride_lb
        + kv_h * stride_lh
        + offs_p[:, None] * stride_lp
        + offs_d[None, :] * stride_ld,
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)  # [BP, BD]
    hi = tl.load(
        hi_ptr
        + b * stride_hb
        + kv_h * stride_hh
        + offs_p[:, None] * stride_hp
        + offs_d[None, :] * stride_hd,
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)
    bound = tl.sum(tl.maximum(lo * q[None, :], hi * q[None, :]), axis=1)  # [BP]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_p * stride_op, bound, mask=p_mask)


@triton.jit
def _quest_decode_kernel(
    q_ptr,  # [B, Hq, d]
    k_ptr,  # [B, Hkv, N, d]
    v_ptr,  # [B, Hkv, N, d]
    pages_ptr,  # [B, Hq, k] int64
    out_ptr,  # [B, Hq, d]
    n_selected,  # k
    length,
    page,
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
    stride_pb,
    stride_ph,
    stride_pk,
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
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * scale
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    p_base = pages_ptr + b * stride_pb + h * stride_ph

    m_i = tl.full((1,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((1,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(0, n_selected):
        first = tl.load(p_base + j * stride_pk) * page  # int64 token index of the page start
        for r0 in range(0, page, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            offs_n = first + rows
            # rows past the page, tokens past length; and indices outside the cache read nothing
            n_mask = (rows < page) & (offs_n >= 0) & (offs_n < length)
            tile_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(
                k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=tile_mask,
                other=0.0,
            ).to(tl.float32)  # [BN, BD]
            s = tl.sum(k * q[None, :], axis=1)  # [BN]
            s = tl.where(n_mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))  # [1]
            # a fully masked step before any valid token keeps m at -inf: shift by 0, not -inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe)  # [BN]; zero on masked rows
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


def scores_config(n_pages: int, head_dim: int, interpreted: bool) -> dict[str, int]:
    """Scoring tiles: ``BLOCK_D`` the next power of two of ``head_dim`` (``tl.arange`` needs one);
    ``BLOCK_P`` 32 pages on the GPU (two 32 x 128 fp32 tiles stay in registers for 4 warps; not
    yet swept on hardware), up to :data:`INTERPRET_BLOCK_P` in the interpreter. Never wider than
    the next power of two of ``P``, so short caches launch no idle rows."""
    block_p = min(INTERPRET_BLOCK_P if interpreted else 32, triton.next_power_of_2(n_pages))
    return {"BLOCK_P": block_p, "BLOCK_D": triton.next_power_of_2(head_dim)}


def decode_config(page: int, head_dim: int) -> dict[str, int]:
    """Decode tiles: ``BLOCK_N`` covers one page (Quest uses 16 tokens) up to 64 rows, the RAT+
    decode tile (a 64 x 128 fp32 tile stays in registers for 4 warps); longer pages take several
    steps. ``BLOCK_D`` the next power of two of ``head_dim``."""
    return {
        "BLOCK_N": min(triton.next_power_of_2(page), 64),
        "BLOCK_D": triton.next_power_of_2(head_dim),
    }


def quest_page_scores_triton(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton page scoring (contract of
    :func:`~tersa.kernels.quest_decode.reference.quest_page_scores_reference`, computed in fp32).

    CPU tensors run in the Triton interpreter (``TRITON_INTERPRET=1``). ``config`` (``BLOCK_P``,
    ``BLOCK_D``, optionally ``num_warps``) forces one tile shape, for tests.
    """
    check_scores_args(q, kmin, kmax)
    b, hq, d = q.shape
    p = kmin.shape[2]
    out = torch.empty(b, hq, p, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if config is None:
        config = scores_config(p, d, is_interpreted(q)) | {"num_warps": 4}
    grid = (b * hq, triton.cdiv(p, config["BLOCK_P"]))
    _quest_scores_kernel[grid](
        *(q, kmin, kmax, out, p, d, hq // kmin.shape[1]),
        *(*q.stride(), *kmin.stride(), *kmax.stride(), *out.stride()),
        hq,
        **config,
    )
    return out


def quest_decode_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pages: torch.Tensor,
    length: int,
    page: int,
    scale: float | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton Quest decode attention (contract of
    :func:`~tersa.kernels.quest_decode.reference.quest_decode_reference`).

    The page indices are not checked (that would cost a host sync per step); an index outside
    ``[0, P)`` reads nothing, a repeated one counts twice. CPU tensors run in the Triton
    interpreter. ``config`` (``BLOCK_N``, ``BLOCK_D``, optionally ``num_warps``) forces one tile
    shape, for tests.
    """
    check_decode_args(q, keys, values, pages, length, page)
    b, hq, d = q.shape
    out = torch.empty_like(q)
    if b == 0 or hq == 0:
        return out
    if config is None:
        config = decode_config(page, d) | {"num_warps": 4}
    scale = d**-0.5 if scale is None else scale
    _quest_decode_kernel[(b * hq,)](
        *(q, keys, values, pages, out, pages.shape[2], length, page, d, hq // keys.shape[1], scale),
        *(*q.stride(), *keys.stride(), *values.stride(), *pages.stride(), *out.stride()),
        hq,
        **config,
    )
    return out
