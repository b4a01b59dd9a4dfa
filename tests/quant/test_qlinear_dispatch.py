"""QuantLinear's kernel dispatch: which path each scheme takes, and each kernel path against the
fake-quant reference forward (torch paths on CPU, Triton interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

import copy
from unittest.mock import patch

import pytest
import torch
from torch import nn

from tersa.eval.numerics import err_ratio
from tersa.quant import qlinear_dispatch
from tersa.quant.qlinear import QuantLinear
from tersa.quant.qlinear_dispatch import kernel_family, select_path
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tests.kernels.helpers import INTERPRET, assert_kernel_close, requires_cuda

W8 = WeightScheme(bits=8)
W4G = WeightScheme(bits=4, granularity="group", group_size=32, symmetric=False)
W4C = WeightScheme(bits=4, granularity="channel")
A8 = ActivationScheme(bits=8)

# Kernel vs fake-quant, float32. W8A8: the same integers summed exactly (int32) or in float32 after
# scaling: measured relative RMS ~1e-7. W4A16: the same float32 weights, another GEMM call.
RMS_TOL = 1e-6


def make_layer(
    k: int, n: int, w: WeightScheme | None, a: ActivationScheme | None, bias: bool = True
) -> QuantLinear:
    return QuantLinear.from_float(nn.Linear(k, n, bias=bias), w, a)


def fake_quant_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on the reference path (dequantized weight, fake-quantized input)."""
    with patch("tersa.quant.qlinear.select_path", return_value="fake_quant"):
        return layer(x)


def assert_matches_fake_quant(layer: QuantLinear, x: torch.Tensor) -> None:
    out, ref = layer(x), fake_quant_forward(layer, x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert err_ratio(ref, out) < RMS_TOL
    assert float((ref - out).abs().max()) <= 1e-5 * float(ref.abs().max())


# ------------------------------------------------------------------------------------- selection

PATHS = [  # (weights, activations, CPU path)
    (W4G, None, "w4a16_torch"),
    (W4C, None, "w4a16_torch"),
    (WeightScheme(bits=4, granularity="group", group_size=64), None, "w4a16_torch"),
    (W8, A8, "w8a8_torch"),
    (W4G, A8, "fake_quant"),  # W4A8
    (W8, None, "fake_quant"),  # W8A16: no kernel
    (WeightScheme(bits=8, symmetric=False), A8, "fake_quant"),
    (W8, ActivationScheme(bits=8, symmetric=False), "fake_quant"),
    (W8, ActivationScheme(bits=8, granularity="tensor"), "fake_quant"),  # static
    (W8, ActivationScheme(bits=6), "fake_quant"),
    (WeightScheme(bits=8, granularity="tensor"), A8, "fake_quant"),
    (WeightScheme(bits=4, granularity="tensor"), None, "fake_quant"),
    (WeightScheme(bits=3, granularity="group", group_size=32), None, "fake_quant"),
    (None, A8, "fake_quant"),
]


@pytest.mark.parametrize(("w", "a", "path"), PATHS)
def test_cpu_path_per_scheme(w: WeightScheme | None, a: ActivationScheme | None, path: str) -> None:
    layer = make_layer(72, 40, w, a)
    if a is not None and a.granularity == "tensor":
        layer.set_input_range(-3.0, 3.0)
    x = torch.randn(3, 72)
    assert select_path(layer, x) == path  # never Triton on CPU tensors
    assert kernel_family(w, a) == (None if path == "fake_quant" else path.split("_")[0])
    assert layer(x).shape == (3, 40)


@pytest.mark.parametrize(("w", "a"), [(W4G, None), (W8, A8)])
def test_float64_and_autograd_take_the_reference(
    w: WeightScheme, a: ActivationScheme | None
) -> None:
    layer = make_layer(72, 40, w, a)
    assert select_path(layer, torch.randn(3, 72, dtype=torch.float64)) == "fake_quant"
    x = torch.randn(3, 72, requires_grad=True)
    assert select_path(layer, x) == "fake_quant"  # the kernels have no backward
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert select_path(layer, x) != "fake_quant"


# ------------------------------------------------------------------------- torch paths vs reference

SHAPES = [(123, 45), (200, 37), (1500, 24)]  # (K, N): no multiple of 16; 1500 > 1024: K slices


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_w8a8_int8_path_matches_fake_quant(m: int, k: int, n: int, bias: bool) -> None:
    layer = make_layer(k, n, W8, A8, bias)
    x = torch.randn(m, k) * 2
    assert select_path(layer, x) == "w8a8_torch"
    assert_matches_fake_quant(layer, x)
    assert_matches_fake_quant(layer, x.reshape(1, m, k).expand(2, m, k) * 0.5)  # [B, T, K]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("w", [W4G, W4C, WeightScheme(bits=4, granularity="group", group_size=64)])
@pytest.mark.parametrize(("k", "n"), [(123, 45), (200, 37), (20, 8)])  # 20 < one group of 32
@pytest.mark.parametrize("m", [1, 17])
def test_w4a16_path_matches_fake_quant(m: int, k: int, n: int, w: WeightScheme, bias: bool) -> None:
    layer = make_layer(k, n, w, None, bias)
    x = torch.randn(2, m, k)  # [B, T, K]
    assert select_path(layer, x) == "w4a16_torch"
    assert_matches_fake_quant(layer, x)


@pytest.mark.parametrize(("w", "a"), [(W4G, None), (W8, A8)])
def test_smoothed_layer_smooths_before_the_kernel(
    w: WeightScheme, a: ActivationScheme | None
) -> None:
    src = make_layer(123, 45, w, a)
    layer = QuantLinear(123, 45, True, w, a, smooth="scale_shift")
    state = src.state_dict() | {
        "smooth_scale": torch.rand(123) + 0.5,
        "smooth_shift": torch.randn(123),
    }
    layer.load_state_dict(state)
    x = torch.randn(5, 123)
    assert select_path(layer, x) != "fake_quant"
    assert_matches_fake_quant(layer, x)
    x_smooth = (x - layer.smooth_shift) / layer.smooth_scale
    torch.testing.assert_close(layer(x), src(x_smooth))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("w", "a"), [(W4G, None), (W8, A8)])
def test_low_precision_inputs_compute_in_float32(
    w: WeightScheme, a: ActivationScheme | None, dtype: torch.dtype
) -> None:
    layer = QuantLinear.from_float(nn.Linear(123, 45).to(dtype), w, a)
    x = torch.randn(2, 3, 123).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    # the same scales and bias upcast (exactly) to float32: the float32 result, rounded once
    layer32 = copy.deepcopy(layer).float()
    assert torch.equal(out, layer32(x.float()).to(dtype))
    # the fake-quant reference rounds x̂ and Ŵ to the input dtype first: 16-bit agreement only
    assert_kernel_close(fake_quant_forward(layer32, x.float()), out.float(), torch.bfloat16)


# ------------------------------------------------------------------ Triton (interpreter on CPU)

needs_interpreter = pytest.mark.skipif(
    not INTERPRET,
    reason="forcing the Triton path on CPU tensors needs TRITON_INTERPRET=1",
)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("w", "a"), [(W4G, None), (W4C, None), (W8, A8)])
def test_forced_triton_path_through_quantlinear(
    w: WeightScheme, a: ActivationScheme | None, dtype: torch.dtype
) -> None:
    pytest.importorskip("triton")
    layer = make_layer(72, 40, w, a).to(dtype)
    x = (torch.randn(2, 3, 72) * 2).to(dtype)
    torch_out = layer(x)
    with patch.object(qlinear_dispatch, "use_triton", return_value=True):
        assert select_path(layer, x).endswith("_triton")
        out = layer(x)  # CPU tensors: the launchers run in the interpreter
    # float32: the same math; bf16: the interpreter truncates the final store (<= 1 ulp)
    assert_kernel_close(torch_out, out, dtype)


# --------------------------------------------------------------------- CUDA (compiled, tuned)


# Asymmetric 4-bit, bf16: the kernel variants tests/kernels compiles already (bench/gpu_check.sh).
W4_G128_ASYM = WeightScheme(bits=4, granularity="group", group_size=128, symmetric=False)
W4C_ASYM = WeightScheme(bits=4, granularity="channel", symmetric=False)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m", [1, 33])  # decode (split-K) and prefill configs
@pytest.mark.parametrize(("w", "a"), [(W4_G128_ASYM, None), (W4C_ASYM, None), (W8, A8)])
def test_cuda_quantlinear_runs_triton(w: WeightScheme, a: ActivationScheme | None, m: int) -> None:
    layer = make_layer(520, 264, w, a).to(torch.bfloat16)
    x = torch.randn(2, m, 520, dtype=torch.bfloat16)
    ref = layer(x)  # CPU torch path, float32 math
    layer_cuda = copy.deepcopy(layer).cuda()
    assert select_path(layer_cuda, x.cuda()) == select_path(layer, x).replace("torch", "triton")
    assert_kernel_close(ref, layer_cuda(x.cuda()).cpu(), torch.bfloat16)
