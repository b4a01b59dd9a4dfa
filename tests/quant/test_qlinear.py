"""QuantLinear: construction, numerics vs the float layer, calibration, state-dict round trips."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tersa.eval.numerics import sqnr_db
from tersa.quant.primitives import (
    dequantize_weight,
    fake_quantize_per_token,
    fake_quantize_static,
    quantize_weight,
)
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme

IN, OUT = 123, 45
W8 = WeightScheme(bits=8)
W4G = WeightScheme(bits=4, granularity="group", group_size=32, symmetric=False)  # groups 32,..,27
A8_TOKEN = ActivationScheme(bits=8)
A8_STATIC = ActivationScheme(bits=8, granularity="tensor")
A8_STATIC_ASYM = ActivationScheme(bits=8, granularity="tensor", symmetric=False)


@pytest.fixture
def linear() -> nn.Linear:
    return nn.Linear(IN, OUT)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(1, 3, IN)


def _calibrated(linear: nn.Linear, w: WeightScheme | None, a: ActivationScheme) -> QuantLinear:
    ql = QuantLinear.from_float(linear, w, a)
    ql.start_calibration()
    ql(torch.randn(2, 5, IN))
    ql.finish_calibration()
    return ql


# Floors sit ~3 dB below the measured values. nn.Linear's init is uniform, crest factor √3, so
# per-channel int8 gives 10·log10(12 · 127² / 3) ≈ 48 dB (measured 47.7); per-token int8 inputs
# (Gaussian, crest ~2.6) measure 45.2 alone and 43.0 together with W8; W4 g32 asym measures 23.8.
@pytest.mark.parametrize(
    ("w", "a", "floor"),
    [(W8, None, 44.0), (W8, A8_TOKEN, 40.0), (W4G, None, 21.0), (None, A8_TOKEN, 42.0)],
)
def test_from_float_output_sqnr(
    linear: nn.Linear,
    x: torch.Tensor,
    w: WeightScheme | None,
    a: ActivationScheme | None,
    floor: float,
) -> None:
    ql = QuantLinear.from_float(linear, w, a)
    y = ql(x)
    assert y.shape == (1, 3, OUT) and y.dtype == torch.float32
    assert sqnr_db(linear(x), y) > floor


def test_forward_is_fake_quant_then_linear(linear: nn.Linear, x: torch.Tensor) -> None:
    ql = QuantLinear.from_float(linear, W4G, A8_TOKEN)
    expected = F.linear(fake_quantize_per_token(x, 8, True), ql.dequantized_weight(), linear.bias)
    assert torch.equal(ql(x), expected)


@pytest.mark.parametrize("scheme", [W8, W4G, WeightScheme(bits=3, granularity="tensor")])
def test_dequantized_weight_matches_primitives(linear: nn.Linear, scheme: WeightScheme) -> None:
    ql = QuantLinear.from_float(linear, scheme, None)
    expected = dequantize_weight(quantize_weight(linear.weight.detach(), scheme))
    assert torch.equal(ql.dequantized_weight(), expected)
    assert torch.equal(ql.dequantized_weight(), expected)  # second call: cached codes


def test_buffers_names_shapes_dtypes(linear: nn.Linear) -> None:
    ql = QuantLinear.from_float(linear, W4G, A8_STATIC_ASYM)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in ql.state_dict().items()}
    assert shapes == {
        "weight_packed": ((OUT, 16), torch.int32),  # ceil(123 / 8) words of 8 nibbles
        "weight_scale": ((OUT, 4), torch.float32),  # ceil(123 / 32) groups
        "weight_zero_point": ((OUT, 4), torch.int8),
        "bias": ((OUT,), torch.float32),
        "input_scale": ((1,), torch.float32),
        "input_zero_point": ((1,), torch.int8),
    }
    assert ql.storage_bytes() == OUT * 16 * 4 + OUT * 4 * 4 + OUT * 4 + OUT * 4 + 4 + 1
    sym = QuantLinear.from_float(nn.Linear(IN, OUT, bias=False), W8, None)
    assert set(sym.state_dict()) == {"weight_packed", "weight_scale"}
    assert sym.weight_scale.shape == (OUT, 1) and sym.bias is None


def test_extra_repr_has_scheme_tags(linear: nn.Linear) -> None:
    text = repr(QuantLinear.from_float(linear, W4G, A8_TOKEN))
    assert "in_features=123, out_features=45" in text
    assert "weights=w4-g32-asym" in text and "activations=a8-token-sym" in text


def test_conv1d_matches_equivalent_linear(linear: nn.Linear, x: torch.Tensor) -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(OUT, IN)  # weight [in, out]
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    for w, a in [(W4G, A8_TOKEN), (None, None)]:
        from_conv = QuantLinear.from_float(conv, w, a)
        from_linear = QuantLinear.from_float(linear, w, a)
        for k, v in from_linear.state_dict().items():
            assert torch.equal(from_conv.state_dict()[k], v), k
        assert torch.equal(from_conv(x), from_linear(x))
    torch.testing.assert_close(QuantLinear.from_float(conv, None, None)(x), conv(x))


def test_static_calibration_flow(linear: nn.Linear, x: torch.Tensor) -> None:
    ql = QuantLinear.from_float(linear, W8, A8_STATIC)
    with pytest.raises(RuntimeError, match="not calibrated"):
        ql(x)
    ql.start_calibration()
    x1, x2 = torch.randn(1, 3, IN), 3 * torch.randn(1, 1, IN)
    # while calibrating, the input is not quantized (the weight is)
    w_hat = ql.dequantized_weight()
    assert torch.equal(ql(x1), F.linear(x1, w_hat, linear.bias))
    assert torch.equal(ql(x2), F.linear(x2, w_hat, linear.bias))
    ql.finish_calibration()
    # running max over both batches and all tokens
    amax = torch.maximum(x1.abs().amax(), x2.abs().amax())
    torch.testing.assert_close(ql.input_scale, (amax / 127).reshape(1))
    y = ql(x)
    assert torch.equal(
        y, F.linear(fake_quantize_static(x, ql.input_scale, None, 8), w_hat, ql.bias)
    )
    assert not torch.equal(y, F.linear(x, w_hat, linear.bias))
    # one scale for all tokens, set by a 3x wider calibration batch: 33.4 dB measured
    assert sqnr_db(linear(x), y) > 30


def test_static_calibration_activation_only_is_exact_float(linear: nn.Linear) -> None:
    ql = QuantLinear.from_float(linear, None, A8_STATIC_ASYM)
    ql.start_calibration()
    x = torch.randn(3, IN) + 1.0
    assert torch.equal(ql(x), linear(x))
    ql.finish_calibration()
    zp = ql.input_zero_point
    assert zp.dtype == torch.int8 and zp.item() != 0
    assert sqnr_db(linear(x), ql(x)) > 42  # measured 46.0


def test_calibration_errors(linear: nn.Linear) -> None:
    ql = QuantLinear.from_float(linear, W8, A8_STATIC)
    with pytest.raises(RuntimeError, match="without start_calibration"):
        ql.finish_calibration()
    ql.start_calibration()
    with pytest.raises(RuntimeError, match="no inputs were observed"):
        ql.finish_calibration()
    with pytest.raises(RuntimeError, match="not static"):
        QuantLinear.from_float(linear, W8, A8_TOKEN).start_calibration()


@pytest.mark.parametrize(
    ("w", "a"), [(W4G, A8_STATIC_ASYM), (W8, A8_TOKEN), (None, A8_STATIC), (W8, None)]
)
def test_meta_build_then_load_state_dict(
    linear: nn.Linear, x: torch.Tensor, w: WeightScheme | None, a: ActivationScheme | None
) -> None:
    static = a is not None and a.granularity == "tensor"
    src = _calibrated(linear, w, a) if static else QuantLinear.from_float(linear, w, a)
    record = json.loads(json.dumps(src.scheme_dict()))
    with torch.device("meta"):
        dst = QuantLinear.from_scheme_dict(record, IN, OUT, bias=True, dtype=torch.float32)
    assert all(t.is_meta for t in dst.state_dict().values())
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.scheme_dict() == src.scheme_dict()
    assert torch.equal(dst(x), src(x))


def test_scheme_dict_values(linear: nn.Linear) -> None:
    d = QuantLinear.from_float(linear, W4G, None).scheme_dict()
    assert d == {
        "weights": {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False},
        "activations": None,
    }


def test_load_state_dict_in_place_refreshes_cached_codes(x: torch.Tensor) -> None:
    a = QuantLinear.from_float(nn.Linear(IN, OUT), W4G, None)
    b = QuantLinear.from_float(nn.Linear(IN, OUT), W4G, None)
    a(x)  # fills a's code cache
    a.load_state_dict(b.state_dict())  # copy_ into the same tensors
    assert torch.equal(a(x), b(x))


def test_deepcopy_after_forward(linear: nn.Linear, x: torch.Tensor) -> None:
    ql = QuantLinear.from_float(linear, W4G, A8_TOKEN)
    y = ql(x)
    assert torch.equal(copy.deepcopy(ql)(x), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_source(dtype: torch.dtype, x: torch.Tensor) -> None:
    linear = nn.Linear(IN, OUT).to(dtype)
    ql = QuantLinear.from_float(linear, W8, A8_TOKEN)
    assert ql.weight_scale.dtype == dtype and ql.bias.dtype == dtype
    y = ql(x.to(dtype))
    assert y.dtype == dtype
    ref = F.linear(x, linear.weight.float(), linear.bias.float())
    assert sqnr_db(ref, y) > 38  # measured 41.8 (bf16) and 42.8 (fp16) against the fp32 linear
