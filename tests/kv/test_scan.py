"""The gated recurrence: chunked = naive = repeated steps, the custom backward, edge cases."""

from __future__ import annotations

import pytest
import torch

from tersa.kv.scan import gated_scan, gated_scan_chunked, gated_scan_naive, gated_step


def inputs(batch: int, length: int, *rest: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, length, *rest, generator=gen, dtype=dtype)
    b = torch.randn(batch, length, *rest, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, *rest, generator=gen, dtype=dtype)
    return a, b, h0


@pytest.mark.parametrize("length", [1, 5, 16, 17, 63])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_matches_naive(length: int, chunk: int, with_h0: bool) -> None:
    a, b, h0 = inputs(2, length, 3, 5)
    h0 = h0 if with_h0 else None
    ref, ref_last = gated_scan_naive(a, b, h0)
    for fn in (gated_scan_chunked, gated_scan):
        out, last = fn(a, b, h0, chunk)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(last, ref_last, rtol=1e-12, atol=1e-12)


def test_naive_is_the_recurrence() -> None:
    a, b, h0 = inputs(1, 3, 2)
    out, _ = gated_scan_naive(a, b, h0)
    h1 = a[:, 0] * h0 + b[:, 0]
    h2 = a[:, 1] * h1 + b[:, 1]
    torch.testing.assert_close(out[:, 1], h2)


def test_steps_match_scan() -> None:
    a, b, h0 = inputs(2, 23, 4)
    ref, _ = gated_scan(a, b, h0, 16)
    h = h0
    for t in range(23):
        h = gated_step(a[:, t], b[:, t], h)
        torch.testing.assert_close(h, ref[:, t], rtol=1e-12, atol=1e-12)


def test_custom_backward_matches_autograd_of_naive() -> None:
    a, b, h0 = inputs(2, 37, 3)
    weights = torch.randn(2, 37, 3, dtype=torch.float64)
    grads = []
    for fn in (gated_scan_naive, lambda a, b, h0: gated_scan(a, b, h0, 8)):
        leaves = [t.clone().requires_grad_() for t in (a, b, h0)]
        out, last = fn(*leaves)
        ((out * weights).sum() + 2.0 * last.sum()).backward()
        grads.append([t.grad for t in leaves])
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_gradcheck_small() -> None:
    a, b, h0 = (t.requires_grad_() for t in inputs(1, 7, 2))
    assert torch.autograd.gradcheck(lambda a, b, h0: gated_scan(a, b, h0, 3), (a, b, h0))


def test_float32_on_16_bit_inputs_and_extreme_gates() -> None:
    a = torch.tensor([[[0.0], [1.0], [1.0], [0.0]]], dtype=torch.bfloat16)
    b = torch.tensor([[[2.0], [0.0], [0.0], [5.0]]], dtype=torch.bfloat16)
    out, last = gated_scan(a, b, None, 16)
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == [2.0, 2.0, 2.0, 5.0] and last.item() == 5.0


def test_empty_sequence() -> None:
    a, b, h0 = inputs(2, 0, 3)
    out, last = gated_scan(a, b, h0)
    assert out.shape == (2, 0, 3)
    torch.testing.assert_close(last, h0)


def test_rejects_bad_shapes() -> None:
    a, b, h0 = inputs(2, 5, 3)
    with pytest.raises(ValueError, match=r"a and b must share one shape"):
        gated_scan(a, b[:, :4])
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 3\)"):
        gated_scan(a, b, h0[:1])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        gated_scan_chunked(a, b, None, 0)
