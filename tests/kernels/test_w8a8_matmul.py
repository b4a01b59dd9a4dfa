"""W8A8 matmul: per-token quantization and the exact integer GEMM of the torch reference, the
Triton kernels (interpreted on CPU, compiled on CUDA) against it, and argument checks."""

from __future__ import annotations

import pytest
import torch

from tersa.eval.numerics import err_ratio
from tersa.kernels.w8a8_matmul import w8a8_matmul, w8a8_matmul_reference
from tersa.kernels.w8a8_matmul.reference import int_matmul, quantize_per_token
from tersa.quant.primitives import QuantizedWeight, dequantize_weight, fake_quantize_per_token
from tersa.quant.primitives import quantize_weight as quantize_w
from tersa.quant.scheme import WeightScheme
from tests.kernels.helpers import assert_kernel_close, launch_device, requires_cuda


def make_weight(n: int, k: int, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Symmetric per-channel int8 codes ``[n, k]`` and scale ``[n, 1]`` of a random weight."""
    return quantize_w(torch.randn(n, k, dtype=dtype), WeightScheme(bits=8))


def tie_rows(k: int) -> torch.Tensor:
    """Rows with exact rounding ties (scale 1: max|x| = 127) and an all-zero row, ``[3, k]``."""
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
    row = torch.cat([torch.tensor([127.0]), ties.repeat(k)])[:k]
    return torch.stack([row, -row * 0.25, torch.zeros(k)])


# ---------------------------------------------------------------------------------- reference


@pytest.mark.parametrize(("m", "k", "n"), [(1, 72, 40), (17, 200, 24), (4, 2000, 8)])
def test_reference_matches_float64_fake_quant_matmul(m: int, k: int, n: int) -> None:
    qw = make_weight(n, k, torch.float64)
    x, bias = torch.randn(m, k) * 3, torch.randn(n)
    x_hat = fake_quantize_per_token(x, 8, symmetric=True).double()  # [M, K]
    expected = x_hat @ dequantize_weight(qw).t() + bias.double()  # [M, N], float64
    out = w8a8_matmul_reference(x, qw.codes, qw.scale, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert err_ratio(expected, out) < 1e-6


def test_quantize_per_token_is_fake_quantize_per_token() -> None:
    x = torch.cat([torch.randn(5, 72) * 4, tie_rows(72)])
    codes, scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (8, 1) and scale.dtype == torch.float32
    assert torch.equal(codes.float() * scale, fake_quantize_per_token(x, 8, symmetric=True))
    assert codes[5, :7].tolist() == [127, 0, 2, 2, 0, -2, -2]  # ties to even
    assert codes[7].abs().max() == 0  # zero row


def test_int_matmul_is_exact_past_float32_range() -> None:
    # K · 127 · 128 > 2^24: a float32 GEMM would round; the reference must not
    k = 2048
    a = torch.full((2, k), -128, dtype=torch.int8)
    a[1, ::2] = 127
    b = torch.randint(-128, 128, (3, k), dtype=torch.int8)
    b[0] = -128
    expected = a.long() @ b.long().t()
    out = int_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), expected)


def test_reference_keeps_leading_dims_and_dtype() -> None:
    qw = make_weight(24, 72)
    x = torch.randn(2, 3, 72)
    out = w8a8_matmul_reference(x, qw.codes, qw.scale.reshape(-1))
    assert out.shape == (2, 3, 24)
    assert torch.equal(
        out, w8a8_matmul_reference(x.reshape(6, 72), qw.codes, qw.scale).reshape(2, 3, 24)
    )
    assert w8a8_matmul_reference(x.bfloat16(), qw.codes, qw.scale).dtype == torch.bfloat16


def test_dispatcher_uses_reference_on_cpu() -> None:
    qw = make_weight(40, 72)
    x, bias = torch.randn(3, 72), torch.randn(40)
    assert torch.equal(
        w8a8_matmul(x, qw.codes, qw.scale, bias), w8a8_matmul_reference(x, qw.codes, qw.scale, bias)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": torch.zeros(40, 72, dtype=torch.int32)}, "weight must be int8 codes"),
        ({"weight": torch.zeros(40, 71, dtype=torch.int8)}, r"\[N, K\] with K=72"),
        ({"w_scale": torch.ones(40, 2)}, r"w_scale must be \[N\] or \[N, 1\] with N=40"),
        ({"bias": torch.zeros(40, 1)}, r"bias must be \[N\] = \[40\]"),
        ({"x": torch.zeros(3, 72, dtype=torch.int8)}, "x must be a float tensor"),
    ],
)
def test_rejects_bad_arguments(change: dict, message: str) -> None:
    qw = make_weight(40, 72)
    args = {"x": torch.randn(3, 72), "weight": qw.codes, "w_scale": qw.scale, "bias": None}
    with pytest.raises(ValueError, match=message):
        w8a8_matmul(**(args | change))


# ------------------------------------------------------------------- Triton vs reference (interp)

SHAPES = [(72, 40), (200, 24)]  # (K, N): no multiple of the 32-wide interpreter tile


@pytest.mark.parametrize("k", [72, 1500])  # 1500: rows longer than one quantization chunk
def test_triton_quantize_is_bit_exact(k: int) -> None:
    from tersa.kernels.w8a8_matmul.triton import quantize_per_token_triton

    device = launch_device()
    x = torch.cat([torch.randn(3, k) * 5, tie_rows(k), torch.randn(2, k) * 1e-3])
    codes, scale = quantize_per_token(x)
    codes_t, scale_t = quantize_per_token_triton(x.to(device))
    assert torch.equal(codes_t.cpu(), codes) and torch.equal(scale_t.cpu(), scale)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_triton_integer_gemm_is_exact(m: int, k: int, n: int) -> None:
    from tersa.kernels.w8a8_matmul.triton import INTERPRET_CONFIG, int8_scaled_mm_triton

    device = launch_device()
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, 1, device=device), torch.ones(n, device=device)
    # unit scales: the float32 epilogue returns the int32 sums (|sum| <= 200 · 2^14 < 2^24)
    args = a.to(device), ones_m, b.to(device), ones_n, None, torch.float32
    out = int8_scaled_mm_triton(*args, config=INTERPRET_CONFIG)
    assert torch.equal(out.cpu(), int_matmul(a, b).float())


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_triton_matches_reference(m: int, k: int, n: int) -> None:
    from tersa.kernels.w8a8_matmul.triton import INTERPRET_CONFIG, w8a8_matmul_triton

    device = launch_device()
    qw = make_weight(n, k)
    x, bias = torch.randn(m, k) * 2, torch.randn(n)
    ref = w8a8_matmul_reference(x, qw.codes, qw.scale, bias)
    args = x.to(device), qw.codes.to(device), qw.scale.to(device), bias.to(device)
    out = w8a8_matmul_triton(*args, config=INTERPRET_CONFIG)
    assert_kernel_close(ref, out.cpu(), torch.float32)
    # same integer sums, same float32 epilogue: at most FMA-contraction differences
    assert err_ratio(ref, out.cpu()) < 1e-6


# ------------------------------------------------------------------------- CUDA (compiled, tuned)

GPU_CASES = [  # (M, K, N, dtype): decode, odd shapes (no _int_mm in the reference), prefill
    (1, 4096, 1024, torch.bfloat16),
    (17, 517, 263, torch.float32),
    (33, 203, 41, torch.bfloat16),
    (300, 4096, 1024, torch.bfloat16),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("m", "k", "n", "dtype"), GPU_CASES)
def test_cuda_dispatcher_matches_reference(m: int, k: int, n: int, dtype: torch.dtype) -> None:
    from tersa.kernels.w8a8_matmul.triton import quantize_per_token_triton

    qw = make_weight(n, k)
    x = (torch.randn(m, k) * 2).to(dtype).cuda()
    w, s, bias = qw.codes.cuda(), qw.scale.to(dtype).cuda(), torch.randn(n, dtype=dtype).cuda()
    codes, scale = quantize_per_token(x)  # torch on CUDA: IEEE division, round half to even
    codes_t, scale_t = quantize_per_token_triton(x)
    assert torch.equal(codes_t, codes) and torch.equal(scale_t, scale)
    ref = w8a8_matmul_reference(x, w, s, bias)  # _int_mm where cuBLAS takes the shape
    out = w8a8_matmul(x, w, s, bias)
    assert_kernel_close(ref.cpu(), out.cpu(), dtype)
