"""Quest decode: page bounds, scores and selection against brute-force loops, the bound property,
sparse attention against full and explicitly masked softmax attention, the Triton kernels
(interpreted on CPU, compiled on CUDA) against the reference, argument checks."""

from __future__ import annotations

import pytest
import torch

from tersa.kernels.quest_decode import (
    quest_attention,
    quest_decode,
    quest_decode_reference,
    quest_page_bounds,
    quest_page_scores,
    quest_page_scores_reference,
    quest_select,
)
from tests.kernels.helpers import assert_kernel_close, launch_device, requires_cuda


def make(b: int, hq: int, hkv: int, cap: int, d: int, length: int, dtype=torch.float32, seed=0):
    """Query and a cache whose tokens past ``length`` are NaN: a kernel that reads them fails."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, cap, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, cap, d, generator=gen).to(dtype)
    k[:, :, length:] = float("nan")
    v[:, :, length:] = float("nan")
    return q, k, v


def random_pages(b: int, hq: int, n_total: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[B, Hq, k]`` distinct page indices per head, in random order (not only quest_select's)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n_total, generator=gen)[:k] for _ in range(b * hq)]
    return torch.stack(rows).view(b, hq, k)


# ------------------------------------------------------------------------ bounds, scores, select


def test_page_bounds_are_per_page_min_max_of_valid_tokens() -> None:
    _, k, _ = make(2, 2, 2, 40, 5, 37)
    kmin, kmax = quest_page_bounds(k, 37, 8)
    assert kmin.shape == kmax.shape == (2, 2, 5, 5) and kmin.dtype == torch.float32
    for p in range(5):
        toks = k[:, :, p * 8 : min(p * 8 + 8, 37)]  # the last page: tokens 32..36 only
        torch.testing.assert_close(kmin[:, :, p], toks.amin(2), rtol=0, atol=0)
        torch.testing.assert_close(kmax[:, :, p], toks.amax(2), rtol=0, atol=0)


def test_reference_scores_equal_brute_force_loop() -> None:
    q, k, _ = make(2, 6, 3, 11, 4, 11)
    kmin, kmax = quest_page_bounds(k, 11, 3)
    scores = quest_page_scores(q, kmin, kmax)
    assert scores.shape == (2, 6, 4) and scores.dtype == torch.float32
    for b in range(2):
        for h in range(6):  # query heads 2h', 2h'+1 read KV head h'
            for p in range(4):
                lo, hi = kmin[b, h // 2, p].tolist(), kmax[b, h // 2, p].tolist()
                want = sum(
                    max(qi * m, qi * M) for qi, m, M in zip(q[b, h].tolist(), lo, hi, strict=True)
                )
                assert abs(float(scores[b, h, p]) - want) <= 1e-5 * (1 + abs(want))


@pytest.mark.parametrize("seed", range(4))
def test_score_bounds_every_key_of_its_page(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    length, page = 29 + seed, 1 + 2 * seed  # pages of 1 (tight bound), 3, 5, 7 tokens
    q = torch.randn(2, 4, 8, generator=gen) * torch.rand(2, 4, 8, generator=gen) * 4
    k = torch.randn(2, 2, length, 8, generator=gen) + torch.randn(2, 2, 1, 8, generator=gen) * 3
    kmin, kmax = quest_page_bounds(k, length, page)
    bound = quest_page_scores(q, kmin, kmax).double()  # [B, Hq, P]
    dots = torch.einsum("bhd,bhnd->bhn", q.double(), k.double().repeat_interleave(2, 1))
    per_token = bound.repeat_interleave(page, -1)[..., :length]  # the bound of each token's page
    slack = 1e-5 * torch.einsum(
        "bhd,bhnd->bhn", q.double().abs(), k.double().abs().repeat_interleave(2, 1)
    )
    assert bool((per_token >= dots - slack).all())
    if page == 1:  # one key per page: the bound is that key's score
        torch.testing.assert_close(bound, dots, rtol=1e-5, atol=1e-5)


def test_select_forces_last_page_and_takes_true_top_k() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 9, generator=gen)
    scores[..., -1] = -100.0  # the worst score: still selected
    scores[1, 2, :4] = 7.0  # a tie: the lower pages win
    pages = quest_select(scores, 4)
    assert pages.shape == (2, 3, 4) and pages.dtype == torch.int64
    for b in range(2):
        for h in range(3):
            row = scores[b, h, :8].tolist()
            best = sorted(range(8), key=lambda i: (-row[i], i))[:3]
            assert pages[b, h].tolist() == sorted([*best, 8])
    assert pages[1, 2].tolist() == [0, 1, 2, 8]
    ties = torch.zeros(1, 1, 101)
    ties[..., 50:100] = 1.0  # 50 equal best pages: an unstable sort or topk reorders them
    assert quest_select(ties, 9).tolist() == [[[*range(50, 58), 100]]]


def test_select_sizes() -> None:
    scores = torch.randn(1, 2, 5)
    assert quest_select(scores, 1).tolist() == [[[4], [4]]]
    assert quest_select(scores, 9).tolist() == [[list(range(5))] * 2]  # k = min(n_pages, P)
    assert quest_select(torch.randn(2, 1, 1), 3).tolist() == [[[0]], [[0]]]


# ------------------------------------------------------------------------------ sparse attention


def dense_attention(q, k, v, length: int, scale: float) -> torch.Tensor:
    """Softmax attention of each query head over tokens ``[0, length)`` of its KV head, float64."""
    group = q.shape[1] // k.shape[1]
    kk = k[:, :, :length].double().repeat_interleave(group, 1)
    vv = v[:, :, :length].double().repeat_interleave(group, 1)
    w = torch.softmax(torch.einsum("bhd,bhnd->bhn", q.double(), kk) * scale, -1)
    return torch.einsum("bhn,bhnd->bhd", w, vv)


@pytest.mark.parametrize(
    ("hq", "hkv", "length", "page"), [(4, 2, 1, 4), (3, 3, 7, 4), (4, 2, 37, 8)]
)
def test_all_pages_is_full_attention(hq: int, hkv: int, length: int, page: int) -> None:
    q, k, v = make(2, hq, hkv, 40, 6, length, torch.float64)
    out, pages = quest_attention(q, k, v, length, page, n_pages=10, scale=0.4)
    assert pages.shape[-1] == -(-length // page)
    torch.testing.assert_close(out, dense_attention(q, k, v, length, 0.4))


def test_per_kv_head_selection_is_the_policy_mask() -> None:
    """quest_attention(per_kv_head=True) attends where the policy's mask (heads: kv) does: every
    head of a group gets the pages of the group's summed scores."""
    from tersa.kv.policies import QuestPolicy
    from tersa.kv.policies.select import page_mask

    b, hq, hkv, d, length, page = 2, 6, 2, 5, 37, 4
    q, k, v = make(b, hq, hkv, 40, d, length, torch.float64)
    out, pages = quest_attention(q, k, v, length, page, n_pages=3, scale=0.4, per_kv_head=True)
    assert torch.equal(pages, pages[:, ::3].repeat_interleave(3, 1))  # one set per group
    mask = page_mask(
        QuestPolicy(budget=12, page=page, heads="kv"),
        q[:, :, None].float(),
        k[:, :, :length].float(),
        torch.tensor([length - 1]),
        torch.arange(length),
    )[:, :, 0]  # [B, Hq, Tk]
    kk = k[:, :, :length].repeat_interleave(3, 1)
    vv = v[:, :, :length].repeat_interleave(3, 1)
    logits = torch.einsum("bhd,bhnd->bhn", q, kk) * 0.4
    want = torch.einsum("bhn,bhnd->bhd", logits.masked_fill(~mask, -torch.inf).softmax(-1), vv)
    torch.testing.assert_close(out, want)


def test_decode_equals_attention_over_explicit_token_list() -> None:
    b, hq, hkv, d, length, page = 2, 4, 2, 5, 37, 8
    q, k, v = make(b, hq, hkv, 40, d, length, torch.float64)
    pages = random_pages(b, hq, 5, 2)  # may or may not hold the partial last page
    out = quest_decode(q, k, v, pages, length, page)
    for bi in range(b):
        for h in range(hq):
            toks = [t for p in pages[bi, h].tolist() for t in range(p * page, (p + 1) * page)]
            toks = [t for t in toks if t < length]
            kt, vt = k[bi, h // 2, toks], v[bi, h // 2, toks]  # [n, d]
            w = torch.softmax(kt @ q[bi, h] * d**-0.5, 0)
            torch.testing.assert_close(out[bi, h], w @ vt)


def test_dispatcher_uses_reference_on_cpu() -> None:
    q, k, v = make(1, 2, 1, 9, 8, 9)
    pages = torch.tensor([[[0, 2], [1, 2]]])
    assert torch.equal(
        quest_decode(q, k, v, pages, 9, 4), quest_decode_reference(q, k, v, pages, 9, 4)
    )
    kmin, kmax = quest_page_bounds(k, 9, 4)
    assert torch.equal(quest_page_scores(q, kmin, kmax), quest_page_scores_reference(q, kmin, kmax))


def test_reference_gradients() -> None:
    q, k, v = make(1, 2, 1, 6, 3, 6, torch.float64)
    pages = torch.tensor([[[0, 2], [1, 2]]])
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: quest_decode(*t, pages, 6, 2), args)


# ------------------------------------------------------------------------------ argument checks

Q, KV = torch.zeros(2, 4, 8), torch.zeros(2, 2, 5, 8)
PAGES = torch.zeros(2, 4, 1, dtype=torch.int64)


@pytest.mark.parametrize(
    ("q", "kv", "pages", "length", "page", "message"),
    [
        (torch.zeros(2, 4), KV, PAGES, 1, 2, "q must be a float tensor [B, Hq, d]"),
        (Q.long(), KV, PAGES, 1, 2, "q must be a float tensor [B, Hq, d]"),
        (Q, torch.zeros(2, 3, 5, 8), PAGES, 1, 2, "Hq must be a multiple of Hkv"),
        (Q, KV, PAGES, 6, 2, "length must be in [1, 5]"),
        (Q, KV, PAGES, 0, 2, "length must be in [1, 5]"),
        (Q, KV, PAGES, 5, 0, "page must be >= 1"),
        (Q, KV, PAGES.int(), 5, 2, "pages must be an int64 tensor [B, Hq, k]"),
        (Q, KV, PAGES[:, :2], 5, 2, "pages must be an int64 tensor [B, Hq, k]"),
        (Q, KV, PAGES + 3, 5, 2, "pages must hold page indices in [0, 3)"),
        (Q, KV, PAGES - 1, 5, 2, "pages must hold page indices in [0, 3)"),
        (Q, KV, PAGES.expand(2, 4, 2), 5, 2, "pages must not repeat a page index"),
    ],
)
def test_decode_rejects_bad_arguments(q, kv, pages, length: int, page: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        quest_decode(q, kv, kv.clone(), pages, length, page)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("length", "page", "n_pages", "message"),
    [
        (6, 2, 1, "length must be in [1, 5]"),
        (5, 0, 1, "page must be >= 1"),
        (5, 2, 0, "n_pages must be >= 1"),
    ],
)
def test_attention_rejects_bad_arguments(
    length: int, page: int, n_pages: int, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        quest_attention(Q, KV, KV.clone(), length, page, n_pages)
    assert message in str(err.value)


def test_scores_reject_bad_bounds() -> None:
    lo = torch.zeros(2, 2, 3, 8)
    with pytest.raises(ValueError, match="kmin and kmax must share one shape"):
        quest_page_scores(Q, lo, lo[:, :, :2])
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        quest_page_scores(Q, lo[:, :1].expand(2, 3, 3, 8), lo[:, :1].expand(2, 3, 3, 8))


# ------------------------------------------------------------------- Triton vs reference (interp)

# Tolerances (tests/kernels/helpers.TOL, relative RMS / max error over max|ref|): decode fp32
# 1e-5 / 1e-4, bf16 1e-2 / 2e-2 (the output rounding; the interpreter truncates fp32 -> bf16).
# Scores are fp32 for either input dtype and differ only in summation order: the fp32 row.
# (B, Hq, Hkv, d, length, page, n_pages): the first token alone, a page longer than the cache,
# partial last pages, MHA and GQA, every page selected. Lengths are no multiple of the tile.
CASES = [
    (1, 4, 2, 16, 1, 4, 2),
    (2, 3, 3, 32, 7, 4, 2),
    (1, 4, 2, 32, 7, 8, 3),
    (2, 4, 2, 16, 37, 8, 3),
    (1, 3, 3, 32, 37, 4, 4),
    (2, 3, 3, 16, 37, 4, 10),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "hq", "hkv", "d", "length", "page", "n_pages"), CASES)
def test_triton_matches_reference(b, hq, hkv, d, length, page, n_pages, dtype) -> None:
    from tersa.kernels.quest_decode.triton import quest_decode_triton, quest_page_scores_triton

    device = launch_device()
    q, k, v = make(b, hq, hkv, length + 3, d, length, dtype)
    kmin, kmax = quest_page_bounds(k, length, page)
    scores = quest_page_scores_reference(q, kmin, kmax)
    tri_scores = quest_page_scores_triton(q.to(device), kmin.to(device), kmax.to(device))
    assert_kernel_close(scores, tri_scores.cpu(), torch.float32)
    pages = quest_select(scores, n_pages)
    ref = quest_decode_reference(q, k, v, pages, length, page)
    out = quest_decode_triton(
        q.to(device), k.to(device), v.to(device), pages.to(device), length, page
    )
    assert_kernel_close(ref, out.cpu(), dtype)


def test_triton_strided_views_and_small_tiles() -> None:
    from tersa.kernels.quest_decode.triton import quest_decode_triton, quest_page_scores_triton

    device = launch_device()
    _, k, v = make(2, 4, 2, 40, 12, 34)
    q = torch.randn(2, 12, 4).transpose(1, 2)  # strided query
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, Hkv, d] storage
    kmin, kmax = quest_page_bounds(k, 34, 8)  # 5 pages, the last with 2 tokens
    pages = random_pages(2, 4, 5, 3).transpose(0, 1).contiguous().transpose(0, 1)
    cfg = {"BLOCK_P": 2, "BLOCK_D": 16}  # 3 page tiles, the last one half empty
    scores = quest_page_scores_triton(q.to(device), kmin.to(device), kmax.to(device), config=cfg)
    assert_kernel_close(quest_page_scores_reference(q, kmin, kmax), scores.cpu(), torch.float32)
    ref = quest_decode_reference(q, k, v, pages, 34, 8, scale=0.5)
    out = quest_decode_triton(  # BLOCK_N 4 < page 8: two steps per page, one fully masked
        *(t.to(device) for t in (q, k, v, pages)), 34, 8, 0.5, config={"BLOCK_N": 4, "BLOCK_D": 16}
    )
    assert_kernel_close(ref, out.cpu(), torch.float32)


def test_triton_page_outside_the_cache_reads_nothing() -> None:
    from tersa.kernels.quest_decode.triton import quest_decode_triton

    device = launch_device()
    q, k, v = make(1, 2, 1, 12, 16, 9)  # NaN past token 9: a read there poisons the output
    bad = torch.tensor([[[5, 2, -1], [-7, 1, 3]]])  # P = 3; 5, 3, -1, -7 are outside it
    ref = quest_decode_reference(q, k, v, torch.tensor([[[2], [1]]]), 9, 4)
    out = quest_decode_triton(*(t.to(device) for t in (q, k, v, bad)), 9, 4)
    assert_kernel_close(ref, out.cpu(), torch.float32)


def test_launch_configs() -> None:
    from tersa.kernels.quest_decode.triton import decode_config, scores_config

    assert scores_config(1000, 128, False) == {"BLOCK_P": 32, "BLOCK_D": 128}
    assert scores_config(5, 12, True) == {"BLOCK_P": 8, "BLOCK_D": 16}
    assert decode_config(16, 128) == {"BLOCK_N": 16, "BLOCK_D": 128}
    assert decode_config(100, 80) == {"BLOCK_N": 64, "BLOCK_D": 128}


# ------------------------------------------------------------------------- CUDA (compiled)

GPU_CASES = [  # (B, Hq, Hkv, d, length, page, n_pages, dtype): Quest's 16-token pages, odd sizes
    (4, 32, 8, 128, 4001, 16, 64, torch.bfloat16),
    (1, 16, 16, 64, 16384, 16, 256, torch.bfloat16),
    (3, 6, 2, 80, 77, 8, 4, torch.float32),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("b", "hq", "hkv", "d", "length", "page", "n_pages", "dtype"), GPU_CASES)
def test_cuda_dispatcher_matches_reference(b, hq, hkv, d, length, page, n_pages, dtype) -> None:
    q, k, v = make(b, hq, hkv, length + 5, d, length, dtype)
    kmin, kmax = quest_page_bounds(k, length, page)
    scores = quest_page_scores_reference(q, kmin, kmax)
    cuda_scores = quest_page_scores(q.cuda(), kmin.cuda(), kmax.cuda())
    assert_kernel_close(scores, cuda_scores.cpu(), torch.float32)
    pages = quest_select(scores, n_pages)  # from the CPU scores: near-ties may break differently
    assert torch.equal(quest_select(scores.cuda(), n_pages).cpu(), pages)
    ref = quest_decode_reference(q, k, v, pages, length, page)
    out = quest_decode(q.cuda(), k.cuda(), v.cuda(), pages.cuda(), length, page)
    assert_kernel_close(ref, out.cpu(), dtype)
