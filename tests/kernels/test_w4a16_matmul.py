"""W4A16 matmul: the torch reference against plain dequantize-then-matmul, the Triton kernel
(interpreted on CPU, compiled on CUDA) against the reference, and argument checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tersa.eval.numerics import err_ratio
from tersa.kernels.w4a16_matmul import w4a16_matmul, w4a16_matmul_reference
from tersa.kernels.w4a16_matmul.reference import unpack_uint4
from tersa.quant.primitives import (
    QuantizedWeight,
    dequantize_weight,
    pack_int32,
    quantize_weight,
    unpack_int32,
)
from tersa.quant.scheme import WeightScheme
from tests.kernels.helpers import assert_kernel_close, launch_device, requires_cuda


def make_weight(
    n: int, k: int, group_size: int | None, symmetric: bool, dtype: torch.dtype = torch.float32
) -> tuple[QuantizedWeight, torch.Tensor]:
    """A random 4-bit quantized ``[n, k]`` weight and its packed codes."""
    granularity = "channel" if group_size is None else "group"
    scheme = WeightScheme(
        bits=4, granularity=granularity, group_size=group_size, symmetric=symmetric
    )
    qw = quantize_weight(torch.randn(n, k, dtype=dtype), scheme)
    return qw, pack_int32(qw.codes, 4)


def call(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    qw: QuantizedWeight,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    **kw: object,
) -> torch.Tensor:
    """``fn(x, packed, scale, zero_point, group_size, bias)`` with ``qw``'s parameters."""
    return fn(x, packed, qw.scale, qw.zero_point, qw.group_size, bias, **kw)


def to_device(
    qw: QuantizedWeight, device: str, dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """``qw`` with scale and zero point on ``device`` (the scale cast to ``dtype`` when given)."""
    zp = None if qw.zero_point is None else qw.zero_point.to(device)
    return QuantizedWeight(qw.codes, qw.scale.to(device, dtype), zp, qw.group_size, qw.bits)


# ---------------------------------------------------------------------------------- reference

GROUPS = [32, 64, 128, None]  # K = 200 leaves a short last group for each: 8, 8, 72 inputs


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
def test_reference_matches_float64_dequantize_matmul(
    group_size: int | None, symmetric: bool
) -> None:
    m, k, n = 5, 200, 24
    qw, packed = make_weight(n, k, group_size, symmetric, torch.float64)
    x, bias = torch.randn(m, k, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    expected = x @ dequantize_weight(qw).t() + bias  # [M, N], float64
    out = call(w4a16_matmul_reference, x, qw, packed, bias)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # float32 inputs: the same weights in float32, float32 math
    qw32 = QuantizedWeight(qw.codes, qw.scale.float(), qw.zero_point, qw.group_size, 4)
    out32 = call(w4a16_matmul_reference, x.float(), qw32, packed, bias.float())
    assert out32.dtype == torch.float32 and err_ratio(expected, out32) < 1e-6


@pytest.mark.parametrize("k", [1, 7, 8, 72, 203])
def test_unpack_uint4_matches_unpack_int32(k: int) -> None:
    codes = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = pack_int32(codes, 4)
    assert torch.equal(unpack_uint4(packed, k).to(torch.int8) - 8, unpack_int32(packed, 4, k))
    assert torch.equal(unpack_uint4(packed, k).to(torch.int8) - 8, codes)


def test_reference_keeps_leading_dims_and_dtype() -> None:
    qw, packed = make_weight(24, 72, 32, False)
    x = torch.randn(2, 3, 72)
    out = call(w4a16_matmul_reference, x, qw, packed, None)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, x @ dequantize_weight(qw).t())
    out_bf16 = call(w4a16_matmul_reference, x.bfloat16(), qw, packed, None)
    assert out_bf16.dtype == torch.bfloat16 and err_ratio(out, out_bf16) < 1e-2


def test_dispatcher_uses_reference_on_cpu() -> None:
    qw, packed = make_weight(40, 72, 32, False)
    x, bias = torch.randn(3, 72), torch.randn(40)
    assert torch.equal(
        call(w4a16_matmul, x, qw, packed, bias), call(w4a16_matmul_reference, x, qw, packed, bias)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight_packed": torch.zeros(40, 8, dtype=torch.int32)}, "words per row"),
        ({"weight_packed": torch.zeros(40, 9, dtype=torch.int64)}, "must be int32"),
        ({"scale": torch.ones(40, 2)}, r"scale must be float \[N, G\] = \[40, 3\]"),
        ({"group_size": 0}, "group_size must be positive"),
        ({"zero_point": torch.zeros(40, 3, dtype=torch.int32)}, "zero_point must be int8"),
        ({"bias": torch.zeros(41)}, r"bias must be \[N\] = \[40\]"),
        ({"x": torch.zeros(3, 72, dtype=torch.int8)}, "x must be a float tensor"),
    ],
)
def test_rejects_bad_arguments(change: dict, message: str) -> None:
    qw, packed = make_weight(40, 72, 32, False)
    args = {"x": torch.randn(3, 72), "weight_packed": packed, "scale": qw.scale}
    args |= {"zero_point": qw.zero_point, "group_size": 32, "bias": None}
    with pytest.raises(ValueError, match=message):
        w4a16_matmul(**(args | change))


# ------------------------------------------------------------------- Triton vs reference (interp)

CASES = [  # (K, N, group_size, symmetric): K and N no multiple of the 32-wide interpreter tile
    (72, 40, 32, False),
    (72, 40, 64, True),
    (200, 24, 128, False),
    (72, 40, None, False),
]


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("k", "n", "group_size", "symmetric"), CASES)
def test_triton_matches_reference(
    m: int, k: int, n: int, group_size: int | None, symmetric: bool
) -> None:
    from tersa.kernels.w4a16_matmul.triton import INTERPRET_CONFIG, w4a16_matmul_triton

    device = launch_device()
    qw, packed = make_weight(n, k, group_size, symmetric)
    x, bias = torch.randn(m, k), torch.randn(n)
    ref = call(w4a16_matmul_reference, x, qw, packed, bias)
    # the interpreter's tile on CUDA too: one compile per case (the tuned path: the gpu tests)
    args = x.to(device), to_device(qw, device), packed.to(device), bias.to(device)
    out = call(w4a16_matmul_triton, *args, config=INTERPRET_CONFIG)
    assert_kernel_close(ref, out.cpu(), torch.float32)


TILES = {  # forced tiles reaching each dequantization branch: (BLOCK_N, BLOCK_K, SPLIT_K)
    "split_k": (32, 32, 2),
    "k_tile_spans_groups": (16, 64, 1),
}


@pytest.mark.parametrize(
    ("group_size", "tile"),
    [
        (32, "split_k"),  # fp32 atomics over two K halves, bias added once
        (32, "k_tile_spans_groups"),  # one scale per word, two groups per K step
        (40, "k_tile_spans_groups"),  # a group size that is no power of two
        (12, "split_k"),  # groups that split packed words: one scale per code
        (None, "split_k"),  # per channel, scale in the epilogue
    ],
)
def test_triton_tiles_and_group_layouts(group_size: int | None, tile: str) -> None:
    from tersa.kernels.w4a16_matmul.triton import w4a16_matmul_triton

    device = launch_device()
    m, k, n = 17, 136, 40  # 136 = 4 x 32 + 8: a short last K tile and last word
    qw, packed = make_weight(n, k, group_size, symmetric=False)
    x, bias = torch.randn(m, k), torch.randn(n)
    ref = call(w4a16_matmul_reference, x, qw, packed, bias)
    args = x.to(device), to_device(qw, device), packed.to(device), bias.to(device)
    bn, bk, split_k = TILES[tile]
    config = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": 2}
    out = call(w4a16_matmul_triton, *args, config=config)
    assert_kernel_close(ref, out.cpu(), torch.float32)


# ------------------------------------------------------------------------- CUDA (compiled, tuned)

GPU_CASES = [  # (M, K, N, group_size, symmetric, dtype): decode, mid and prefill paths
    (1, 4096, 1024, 128, False, torch.bfloat16),
    (16, 520, 264, 32, True, torch.float32),
    (33, 520, 264, None, False, torch.bfloat16),
    (300, 4096, 1024, 128, False, torch.bfloat16),
    (300, 520, 264, 64, True, torch.float32),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("m", "k", "n", "group_size", "symmetric", "dtype"), GPU_CASES)
def test_cuda_dispatcher_matches_reference(
    m: int, k: int, n: int, group_size: int | None, symmetric: bool, dtype: torch.dtype
) -> None:
    qw, packed = make_weight(n, k, group_size, symmetric)
    qw = to_device(qw, "cpu", dtype)  # scales stored in the activation dtype, as exported
    x, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    ref = call(w4a16_matmul_reference, x, qw, packed, bias)
    out = call(w4a16_matmul, x.cuda(), to_device(qw, "cuda"), packed.cuda(), bias.cuda())
    assert_kernel_close(ref, out.cpu(), dtype)
