"""RAT+ decode attention: the torch reference against an explicit softmax, the Triton kernel
(interpreted on CPU, compiled on CUDA) against the reference, argument checks."""

from __future__ import annotations

import pytest
import torch

from tersa.kernels.ratplus_decode import ratplus_decode, ratplus_decode_reference
from tests.kernels.helpers import assert_kernel_close, launch_device, requires_cuda


def make(b: int, hq: int, hkv: int, cap: int, d: int, n: int, dtype=torch.float32, seed: int = 0):
    """Query and a cache whose entries past ``n`` are NaN: a kernel that reads them fails."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, cap, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, cap, d, generator=gen).to(dtype)
    k[:, :, n:] = float("nan")
    v[:, :, n:] = float("nan")
    return q, k, v


def test_reference_is_softmax_attention_per_group() -> None:
    q, k, v = make(2, 6, 3, 9, 5, 7, dtype=torch.float64)
    out = ratplus_decode_reference(q, k, v, 7, scale=0.3)
    for h in range(6):
        kh, vh = k[:, h // 2, :7], v[:, h // 2, :7]  # query heads 2h', 2h'+1 share KV head h'
        w = torch.softmax(torch.einsum("bd,bnd->bn", q[:, h], kh) * 0.3, -1)
        torch.testing.assert_close(out[:, h], torch.einsum("bn,bnd->bd", w, vh))


def test_dispatcher_uses_reference_on_cpu() -> None:
    q, k, v = make(1, 2, 1, 4, 8, 3)
    assert torch.equal(ratplus_decode(q, k, v, 3), ratplus_decode_reference(q, k, v, 3))


@pytest.mark.parametrize(
    ("shapes", "n", "message"),
    [
        ((torch.zeros(2, 4), torch.zeros(2, 2, 5, 4)), 1, "q must be a float tensor [B, Hq, d]"),
        ((torch.zeros(2, 4, 8), torch.zeros(2, 3, 5, 8)), 1, "Hq must be a multiple of Hkv"),
        ((torch.zeros(2, 4, 8), torch.zeros(2, 2, 5, 8)), 6, "n must be in [1, 5]"),
        ((torch.zeros(2, 4, 8), torch.zeros(2, 2, 5, 8)), 0, "n must be in [1, 5]"),
    ],
)
def test_rejects_bad_arguments(shapes, n: int, message: str) -> None:
    q, k = shapes
    with pytest.raises(ValueError) as err:
        ratplus_decode(q, k, k.clone(), n)
    assert message in str(err.value)


# ------------------------------------------------------------------- Triton vs reference (interp)

# Tolerances: tests/kernels/helpers.TOL, relative RMS / max error: fp32 1e-5 / 1e-4, bf16 1e-2 / 2e-2.
# (B, Hq, Hkv, capacity, d, n): n = 1 (the first token), n past one 16-entry tile with a tail,
# head_dim no power of two, MHA and GQA groups of 3
CASES = [(1, 3, 1, 5, 24, 1), (2, 4, 2, 40, 12, 37), (1, 2, 2, 33, 20, 17)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "hq", "hkv", "cap", "d", "n"), CASES)
def test_triton_matches_reference(b, hq, hkv, cap, d, n, dtype: torch.dtype) -> None:
    from tersa.kernels.ratplus_decode.triton import ratplus_decode_triton

    device = launch_device()
    q, k, v = make(b, hq, hkv, cap, d, n, dtype)
    ref = ratplus_decode_reference(q, k, v, n)
    out = ratplus_decode_triton(q.to(device), k.to(device), v.to(device), n)
    # bf16: the tolerance covers the output rounding (the interpreter truncates fp32 -> bf16)
    assert_kernel_close(ref, out.cpu(), dtype)


def test_triton_strided_cache_view_and_small_tiles() -> None:
    from tersa.kernels.ratplus_decode.triton import ratplus_decode_triton

    device = launch_device()
    q, k, v = make(2, 4, 2, 50, 12, 50)
    q = torch.randn(2, 12, 4).transpose(1, 2)  # strided query
    k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v[..., :]  # [B, N, Hkv, d] storage
    ref = ratplus_decode_reference(q, k, v, 45, scale=0.5)
    out = ratplus_decode_triton(
        q.to(device), k.to(device), v.to(device), 45, 0.5, config={"BLOCK_N": 8, "BLOCK_D": 16}
    )
    assert_kernel_close(ref, out.cpu(), torch.float32)


def test_launch_config() -> None:
    from tersa.kernels.ratplus_decode.triton import launch_config

    assert launch_config(128, False) == {"BLOCK_N": 64, "BLOCK_D": 128}
    assert launch_config(12, True) == {"BLOCK_N": 16, "BLOCK_D": 16}


# ------------------------------------------------------------------------- CUDA (compiled)

GPU_CASES = [  # (B, Hq, Hkv, capacity, d, n, dtype): a 4k-context D=16 cache, GQA, odd sizes
    (4, 32, 8, 300, 128, 261, torch.bfloat16),
    (1, 16, 16, 4096, 64, 4096, torch.bfloat16),
    (3, 6, 2, 77, 80, 70, torch.float32),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("b", "hq", "hkv", "cap", "d", "n", "dtype"), GPU_CASES)
def test_cuda_dispatcher_matches_reference(b, hq, hkv, cap, d, n, dtype) -> None:
    q, k, v = make(b, hq, hkv, cap, d, n, dtype)
    ref = ratplus_decode_reference(q, k, v, n)
    out = ratplus_decode(q.cuda(), k.cuda(), v.cuda(), n)
    assert_kernel_close(ref, out.cpu(), dtype)
