"""Block-diagonal matmul: the torch reference against a dense block-diagonal matmul, the Triton
kernel (interpreted on CPU, compiled on CUDA) against the reference, and argument checks."""

from __future__ import annotations

import pytest
import torch

from tersa.kernels.block_diag_matmul import block_diag_matmul, block_diag_matmul_reference
from tests.kernels.helpers import assert_kernel_close, launch_device, requires_cuda


def dense_of(w: torch.Tensor) -> torch.Tensor:
    """The full ``[nb*bo, nb*bi]`` block-diagonal matrix of blocks ``w [nb, bo, bi]``."""
    return torch.block_diag(*w.unbind(0))


# ---------------------------------------------------------------------------------- reference


@pytest.mark.parametrize(("nb", "bo", "bi"), [(1, 5, 7), (3, 4, 6), (4, 9, 2)])
def test_reference_matches_dense_block_diagonal(nb: int, bo: int, bi: int) -> None:
    x = torch.randn(5, nb * bi, dtype=torch.float64)
    w = torch.randn(nb, bo, bi, dtype=torch.float64)
    out = block_diag_matmul_reference(x, w)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x @ dense_of(w).t(), rtol=1e-12, atol=1e-12)


def test_reference_keeps_leading_dims_and_dtype() -> None:
    x, w = torch.randn(2, 3, 12, dtype=torch.bfloat16), torch.randn(3, 5, 4)
    out = block_diag_matmul_reference(x, w)
    assert out.shape == (2, 3, 15) and out.dtype == torch.bfloat16
    expected = x.float().reshape(6, 12) @ dense_of(w).t()
    assert_kernel_close(expected.to(torch.bfloat16), out.reshape(6, 15), torch.bfloat16)


def test_reference_is_differentiable() -> None:
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block_diag_matmul, (x, w))


def test_dispatcher_uses_reference_on_cpu() -> None:
    x, w = torch.randn(3, 12), torch.randn(3, 5, 4)
    assert torch.equal(block_diag_matmul(x, w), block_diag_matmul_reference(x, w))


@pytest.mark.parametrize(
    ("x", "w", "message"),
    [
        (
            torch.zeros(3, 12, dtype=torch.int32),
            torch.zeros(3, 5, 4),
            "x must be a float tensor [..., nb*bi], got torch.int32 (3, 12)",
        ),
        (
            torch.zeros(3, 12),
            torch.zeros(15, 12),
            "w must be a float tensor [nb, bo, bi], got torch.float32 (15, 12)",
        ),
        (
            torch.zeros(3, 13),
            torch.zeros(3, 5, 4),
            "x has 13 features but w (3, 5, 4) needs nb*bi = 12",
        ),
    ],
)
def test_rejects_bad_arguments(x: torch.Tensor, w: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError) as err:
        block_diag_matmul(x, w)
    assert str(err.value) == message


# ------------------------------------------------------------------- Triton vs reference (interp)

# Tolerances: tests/kernels/helpers.TOL, relative RMS / max error: fp32 1e-5 / 1e-4, bf16 1e-2 / 2e-2.
# (nb, bo, bi): block sizes no multiple of 16; bi = 37 takes two K steps of the 32-wide
# interpreter tile and bo = 40 two output tiles
SHAPES = [(3, 24, 20), (2, 40, 12), (1, 7, 37)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("nb", "bo", "bi"), SHAPES)
def test_triton_matches_reference(nb: int, bo: int, bi: int, m: int, dtype: torch.dtype) -> None:
    from tersa.kernels.block_diag_matmul.triton import block_diag_matmul_triton

    device = launch_device()
    x, w = torch.randn(m, nb * bi, dtype=dtype), torch.randn(nb, bo, bi, dtype=dtype)
    ref = block_diag_matmul_reference(x, w)
    out = block_diag_matmul_triton(x.to(device), w.to(device))
    # bf16: the tolerance covers the output rounding (the interpreter truncates fp32 -> bf16)
    assert_kernel_close(ref, out.cpu(), dtype)


def test_triton_forced_small_tiles_and_strided_input() -> None:
    from tersa.kernels.block_diag_matmul.triton import block_diag_matmul_triton

    device = launch_device()
    nb, bo, bi = 2, 40, 36  # three N tiles and three K steps of 16, each with a masked tail
    x = torch.randn(2, 9, 2 * nb * bi)[..., ::2]  # strided leading dims and features
    w = torch.randn(nb, bi, bo).transpose(1, 2)  # strided weight
    ref = block_diag_matmul_reference(x, w)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    out = block_diag_matmul_triton(x.to(device), w.to(device), config=config)
    assert out.shape == (2, 9, nb * bo)
    assert_kernel_close(ref, out.cpu(), torch.float32)


def test_triton_no_tokens() -> None:
    from tersa.kernels.block_diag_matmul.triton import block_diag_matmul_triton

    device = launch_device()
    out = block_diag_matmul_triton(
        torch.zeros(0, 12, device=device), torch.randn(3, 5, 4, device=device)
    )
    assert out.shape == (0, 15)


def test_launch_config_tiles() -> None:
    from tersa.kernels.block_diag_matmul.triton import launch_config

    assert launch_config(1, 7, 300, False) == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}
    assert launch_config(500, 768, 512, False) == {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
    assert launch_config(500, 768, 512, True) == {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


# ------------------------------------------------------------------------- CUDA (compiled)

GPU_CASES = [  # (M, nb, bo, bi, dtype): decode and prefill, a BlockDense-like and an odd shape
    (1, 4, 384, 512, torch.bfloat16),
    (16, 2, 1024, 1024, torch.bfloat16),
    (300, 4, 384, 512, torch.bfloat16),
    (33, 3, 100, 72, torch.float32),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("m", "nb", "bo", "bi", "dtype"), GPU_CASES)
def test_cuda_dispatcher_matches_reference(
    m: int, nb: int, bo: int, bi: int, dtype: torch.dtype
) -> None:
    x = torch.randn(m, nb * bi, device="cuda", dtype=dtype)
    w = torch.randn(nb, bo, bi, device="cuda", dtype=dtype) / bi**0.5
    ref = block_diag_matmul_reference(x.cpu(), w.cpu())
    assert_kernel_close(ref, block_diag_matmul(x, w).cpu(), dtype)
