"""Quantization math: qparams, rounding, weight quantization, packing, and the SQNR metric."""

import itertools
import math

import pytest
import torch

from tersa.eval.numerics import err_ratio, sqnr_db
from tersa.quant.primitives import (
    compute_qparams,
    dequantize,
    dequantize_weight,
    expand_groups,
    fake_quantize_per_token,
    fake_quantize_static,
    pack_int32,
    packed_width,
    qrange,
    quantize,
    quantize_weight,
    unpack_int32,
    weight_qparams,
)
from tersa.quant.scheme import WeightScheme

T = torch.tensor

# ------------------------------------------------------------------------------------- qparams


@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange(bits: int) -> None:
    assert qrange(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [0, 1, 9])
def test_qrange_rejects_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="between 2 and 8"):
        qrange(bits)


def test_symmetric_qparams() -> None:
    scale, zp = compute_qparams(T([-2.0, -0.5]), T([1.0, 3.0]), 8, symmetric=True)
    torch.testing.assert_close(scale, T([2.0 / 127, 3.0 / 127]))
    assert zp.dtype == torch.int8 and zp.tolist() == [0, 0]


def test_asymmetric_qparams_hand_computed() -> None:
    # [-1, 3] at 4 bits: s = 4/15, z = -8 - round(-3.75) = -4.
    # [1, 3] widens to [0, 3]: z = qmin. [-3, -1] widens to [-3, 0]: z = -8 - round(-15) = qmax.
    scale, zp = compute_qparams(T([-1.0, 1.0, -3.0]), T([3.0, 3.0, -1.0]), 4, symmetric=False)
    torch.testing.assert_close(scale, T([4 / 15, 3 / 15, 3 / 15]))
    assert zp.dtype == torch.int8 and zp.tolist() == [-4, -8, 7]


def test_asymmetric_zero_exactly_representable() -> None:
    x_min, x_max = torch.rand(1000) * -5, torch.rand(1000) * 5
    for bits in range(2, 9):
        scale, zp = compute_qparams(x_min, x_max, bits, symmetric=False)
        q = quantize(torch.zeros(1000), scale, zp, bits)
        assert torch.equal(q, zp)  # 0 maps onto the zero point ...
        assert torch.equal(dequantize(q, scale, zp), torch.zeros(1000))  # ... and back to 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_empty_range_gives_positive_scale(symmetric: bool) -> None:
    scale, zp = compute_qparams(T([0.0]), T([0.0]), 8, symmetric)
    assert scale.item() > 0
    assert dequantize(quantize(T([0.0]), scale, zp, 8), scale, zp).item() == 0.0


def test_scale_dtype_rounds_before_zero_point() -> None:
    scale, zp = compute_qparams(T([-0.3]), T([1.7]), 8, False, scale_dtype=torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    # zero still exact with the stored (rounded) scale
    assert dequantize(quantize(T([0.0]), scale, zp, 8), scale, zp).item() == 0.0


# ------------------------------------------------------------------------------ quantize / round


def test_quantize_rounds_half_to_even() -> None:
    x = T([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 0.51])
    q = quantize(x, T(1.0), None, 8)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 0, 1]
    assert quantize(T([0.5, 1.5]), T(1.0), T(3, dtype=torch.int8), 8).tolist() == [3, 5]


@pytest.mark.parametrize(("bits", "lo", "hi"), [(8, -128, 127), (4, -8, 7), (2, -2, 1)])
def test_quantize_clamps_at_range_ends(bits: int, lo: int, hi: int) -> None:
    x = T([1e6, -1e6, hi + 0.49, lo - 0.49, hi + 0.51, lo - 0.51])
    assert quantize(x, T(1.0), None, bits).tolist() == [hi, lo, hi, lo, hi, lo]
    # asymmetric: the zero point shifts the codes, the clamp stays at the code range
    assert quantize(T([1e6, -1e6]), T(1.0), T(1, dtype=torch.int8), bits).tolist() == [hi, lo]


def test_dequantize_keeps_scale_dtype() -> None:
    out = dequantize(T([3, -2], dtype=torch.int8), T(0.5, dtype=torch.bfloat16), T(1))
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.0, -1.5]


# ------------------------------------------------------------------------------------- weights


def test_exact_codes_per_channel() -> None:
    # 4-bit symmetric: qmax 7, so row scales are exactly 1 and 2; ties go to even.
    w = T([[7.0, -3.5, 2.5, 0.4], [-14.0, 5.0, 3.0, 1.0]])
    qw = quantize_weight(w, WeightScheme(bits=4))
    assert qw.scale.tolist() == [[1.0], [2.0]] and qw.zero_point is None
    assert qw.codes.tolist() == [[7, -4, 2, 0], [-7, 2, 2, 0]]
    assert dequantize_weight(qw).tolist() == [[7.0, -4.0, 2.0, 0.0], [-14.0, 4.0, 4.0, 0.0]]


def test_tensor_granularity_uses_one_scale() -> None:
    w = T([[7.0, 1.0], [-3.0, 0.5]])
    qw = quantize_weight(w, WeightScheme(bits=4, granularity="tensor"))
    assert qw.scale.shape == (1, 1) and qw.scale.item() == 1.0
    assert qw.codes.tolist() == [[7, 1], [-3, 0]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_shapes_with_short_last_group(symmetric: bool) -> None:
    w = torch.randn(5, 200)
    scheme = WeightScheme(bits=4, granularity="group", group_size=128, symmetric=symmetric)
    qw = quantize_weight(w, scheme)
    assert qw.codes.shape == (5, 200) and qw.codes.dtype == torch.int8
    assert qw.scale.shape == (5, 2) and qw.group_size == 128
    assert (qw.zero_point is None) == symmetric
    assert dequantize_weight(qw).shape == (5, 200)
    # the last group (72 inputs) is scaled by its own range only, no padding enters it
    tail = w[:, 128:]
    if symmetric:
        expected = tail.abs().amax(dim=1) / 7
    else:
        expected = (tail.amax(dim=1).clamp(min=0) - tail.amin(dim=1).clamp(max=0)) / 15
    torch.testing.assert_close(qw.scale[:, 1], expected)


def test_outlier_in_last_group_only_changes_last_group() -> None:
    w = torch.randn(3, 200)
    scheme = WeightScheme(bits=4, granularity="group", group_size=128, symmetric=False)
    s0, z0 = weight_qparams(w, scheme)
    w[:, 150] = 100.0
    s1, z1 = weight_qparams(w, scheme)
    assert torch.equal(s0[:, 0], s1[:, 0]) and torch.equal(z0[:, 0], z1[:, 0])
    assert (s1[:, 1] > 10 * s0[:, 1]).all()


def test_expand_groups_slices_to_in_features() -> None:
    t = T([[1.0, 2.0, 3.0]])
    assert expand_groups(t, 4, 10).tolist() == [[1.0] * 4 + [2.0] * 4 + [3.0] * 2]
    per_channel = t[:, :1]
    assert expand_groups(per_channel, None, 10) is per_channel  # [out, 1] broadcasts as is


def test_zero_weights_exact_with_asymmetric_groups() -> None:
    w = torch.randn(7, 123) + 0.5
    w[:, ::5] = 0.0
    scheme = WeightScheme(bits=3, granularity="group", group_size=32, symmetric=False)
    assert (dequantize_weight(quantize_weight(w, scheme))[:, ::5] == 0).all()


def test_bf16_weight_keeps_dtype() -> None:
    w = torch.randn(45, 123, dtype=torch.bfloat16)
    qw = quantize_weight(w, WeightScheme(bits=8))
    assert qw.scale.dtype == torch.bfloat16
    w_hat = dequantize_weight(qw)
    assert w_hat.dtype == torch.bfloat16 and sqnr_db(w, w_hat) > 38


# Min-max RTN on a Gaussian: SQNR ≈ 10·log10(12 · qmax² / c²) with c = E[max|x|]/σ over the range
# (the crest factor), i.e. ~6.02 dB per bit minus the crest loss. Per channel over 1024 inputs
# c ≈ 3.3 -> int8 ≈ 42.5 dB (measured 42.0); g128 c ≈ 2.6 -> int4 sym ≈ 19.4 (measured 18.6),
# asym spends the 16th level too and measures 20.0. Floors sit ~1.5 dB below the measurements.
SQNR_FLOORS = [
    (WeightScheme(bits=8), 40.5),
    (WeightScheme(bits=8, symmetric=False), 41.0),
    (WeightScheme(bits=8, granularity="tensor"), 37.0),  # measured 39.4: c over the whole tensor
    (WeightScheme(bits=4, granularity="group", group_size=128), 17.0),
    (WeightScheme(bits=4, granularity="group", group_size=128, symmetric=False), 18.5),
]


@pytest.mark.parametrize(("scheme", "floor"), SQNR_FLOORS)
def test_gaussian_weight_sqnr(scheme: WeightScheme, floor: float) -> None:
    w = torch.randn(64, 1024)
    assert sqnr_db(w, dequantize_weight(quantize_weight(w, scheme))) > floor


def test_each_bit_adds_about_6_db() -> None:
    w = torch.randn(64, 1024)
    sqnr = [
        sqnr_db(w, dequantize_weight(quantize_weight(w, WeightScheme(bits=b))))
        for b in (4, 5, 6, 7, 8)
    ]
    gains = [b - a for a, b in itertools.pairwise(sqnr)]
    assert all(5.5 < g < 7.0 for g in gains), gains  # measured 6.1 to 6.6


# --------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_fake_quant(symmetric: bool) -> None:
    x = torch.randn(1, 3, 123)
    y = fake_quantize_per_token(x, 8, symmetric)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert sqnr_db(x, y) > 41  # per-token int8 on 123 Gaussians ≈ 43.6 sym / 44.5 asym measured
    # tokens are independent: a huge token leaves the others untouched
    x2 = x.clone()
    x2[0, 0] *= 1000
    assert torch.equal(fake_quantize_per_token(x2, 8, symmetric)[0, 1:], y[0, 1:])


def test_per_token_bf16_and_zero_token() -> None:
    x = torch.randn(3, 123, dtype=torch.bfloat16)
    x[1] = 0
    y = fake_quantize_per_token(x, 4, symmetric=False)
    assert y.dtype == torch.bfloat16 and (y[1] == 0).all()
    assert sqnr_db(x, y) > 17  # int4 per token on 123 values: ~20 dB


def test_static_fake_quant_clamps() -> None:
    scale, zp = compute_qparams(T(-1.0), T(1.0), 8, symmetric=False)
    x = T([0.0, 0.5, -1.0, 10.0, -10.0])
    y = fake_quantize_static(x, scale, zp, 8)
    assert y[0] == 0.0 and abs(y[1] - 0.5) <= scale / 2
    assert torch.equal(y, dequantize(quantize(x, scale, zp, 8), scale, zp))
    assert y[3] == (127 - zp.item()) * scale and y[4] == (-128 - zp.item()) * scale


# ------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("in_features", [1, 13, 123, 128])
def test_pack_round_trip(bits: int, in_features: int) -> None:
    qmin, qmax = qrange(bits)
    codes = torch.randint(qmin, qmax + 1, (5, in_features), dtype=torch.int8)
    codes[0, 0], codes[-1, -1] = qmin, qmax  # both range ends present
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert (
        packed.shape
        == (5, math.ceil(in_features / (32 // bits)))
        == (
            5,
            packed_width(in_features, bits),
        )
    )
    assert torch.equal(unpack_int32(packed, bits, in_features), codes)


def _signed32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def test_pack_golden_words() -> None:
    # 4 bits: unsigned [0, 15, 8, 9, 10, 11, 12, 13], first value in the lowest nibble; top bit set
    codes = T([[-8, 7, 0, 1, 2, 3, 4, 5]], dtype=torch.int8)
    assert pack_int32(codes, 4).tolist() == [[_signed32(0xDCBA98F0)]]
    codes8 = T([[-128, 127, 0, 1, 5]], dtype=torch.int8)  # 8 bits: [0, 255, 128, 129 | 133]
    assert pack_int32(codes8, 8).tolist() == [[_signed32(0x8180FF00), 133]]
    # 3 bits: 10 values per word, bits 30-31 and the missing 8 values are zero
    assert pack_int32(T([[-4, 3]], dtype=torch.int8), 3).tolist() == [[7 << 3]]
    assert pack_int32(torch.full((1, 10), 3, dtype=torch.int8), 3).tolist() == [[2**30 - 1]]


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_int32(T([[8]], dtype=torch.int8), 4)


def test_unpack_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="does not match in_features=20"):
        unpack_int32(torch.zeros(2, 2, dtype=torch.int32), 4, 20)


# ------------------------------------------------------------------------- metrics (eval.numerics)


def test_sqnr_db_known_values() -> None:
    ref = torch.ones(100)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    assert sqnr_db(ref, ref * 1.01) == pytest.approx(40.0)


def test_err_ratio() -> None:
    ref = torch.full((4, 5), 2.0)
    assert err_ratio(ref, ref * 1.1) == pytest.approx(0.1)
    assert err_ratio(torch.zeros(3), torch.full((3,), 1e-7)) == pytest.approx(0.1)  # floor 1e-6
