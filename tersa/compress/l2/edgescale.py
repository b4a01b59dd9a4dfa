"""EdgeScale, the L2 transform between a weight tensor and integer codes (pure functions).

Per layer an edge ``e`` and a step ``Δ`` (scalars; their absolute values are used):

- encode: ``|w| ≤ |e|`` → ``c = w/(2|e|)``, inside ``[−½, ½]`` so it rounds to 0 (pruned);
  otherwise ``c = sign(w)(½ + (|w| − |e|)/Δ)``, so ``|c| > ½``.
- the codes are ``ĉ = round(c)``; during training the rounding is straight-through (the forward
  pass rounds, the backward pass lets the gradient through unchanged).
- decode, the exact inverse on integers: ``0 → 0``, ``|ĉ| = k ≥ 1 → sign(ĉ)(|e| + (k − ½)Δ)``.
  A continuous ``|ĉ| ≤ ½`` decodes to ``ĉ·2|e|`` (0 for the integer 0), so that the
  straight-through gradient of a pruned weight reaches ``e`` as well.

The grid is therefore ``{0} ∪ {±(|e| + (k − ½)Δ) : k ≥ 1}``: a dead zone of half-width ``|e|``
around 0, then uniform steps. ``e = Δ/2`` is the plain uniform (mid-tread) quantizer; a larger
``e`` prunes more.
"""

from __future__ import annotations

import math

import torch

from tersa.compress.l2.rate import empirical_entropy

# Integer dtypes the codes may be stored in, narrowest first.
CODE_DTYPES = (torch.int8, torch.int16, torch.int32)


def encode(w: torch.Tensor, edge: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Continuous codes ``c`` of the weights ``w`` (any shape; ``edge`` and ``step`` are scalar
    tensors), differentiable in all three."""
    e, d = edge.abs(), step.abs()
    mag = w.abs()
    kept = torch.sign(w) * (0.5 + (mag - e) / d)
    pruned = w / (2 * e)
    return torch.where(mag > e, kept, pruned)


def decode(codes: torch.Tensor, edge: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Weights of (integer-valued, float) ``codes``; the inverse of :func:`encode` on integers."""
    e, d = edge.abs(), step.abs()
    mag = codes.abs()
    kept = torch.sign(codes) * (e + (mag - 0.5) * d)
    pruned = codes * (2 * e)
    return torch.where(mag > 0.5, kept, pruned)


def round_ste(c: torch.Tensor) -> torch.Tensor:
    """``round(c)`` in the forward pass, the identity in the backward pass."""
    return c + (torch.round(c) - c).detach()


def fake_quantize(w: torch.Tensor, edge: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``decode(round(encode(w)))`` with straight-through rounding: the weights the codes stand
    for, differentiable in ``w``, ``edge`` and ``step``.

    The same values and gradients as ``decode(round_ste(encode(w, e, Δ)), e, Δ)``, in fewer
    passes over the weight (its backward is written out, see :class:`_FakeQuantize`).
    """
    return _FakeQuantize.apply(w, edge, step)


class _FakeQuantize(torch.autograd.Function):
    """The straight-through gradients of ``ŵ = decode(round(encode(w)))``, with ``c`` the
    continuous code and ``r = round(c) − c`` its rounding residual:

    - ``∂ŵ/∂w = 1`` (encode scales by ``1/Δ`` or ``1/(2|e|)``, decode by the inverse);
    - kept weights (``|w| > |e|``): ``∂ŵ/∂Δ = r`` and ``∂ŵ/∂e = 0`` (``e`` moves encode and decode
      alike);
    - pruned weights: ``∂ŵ/∂e = 2r`` and ``∂ŵ/∂Δ = 0``;

    times ``sign(e)`` and ``sign(Δ)`` for the absolute values.
    """

    @staticmethod
    def forward(ctx, w, edge, step):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(w, edge, step)
        return decode(torch.round(encode(w, edge, step)), edge, step)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        w, edge, step = ctx.saved_tensors
        _, need_edge, need_step = ctx.needs_input_grad
        grad_edge = grad_step = None
        if need_edge or need_step:
            c = encode(w, edge, step)
            gr = grad * (torch.round(c) - c)  # [out, in]
            kept = w.abs() > edge.abs()
            if need_edge:
                grad_edge = 2 * torch.where(kept, 0.0, gr).sum() * torch.sign(edge)
            if need_step:
                grad_step = torch.where(kept, gr, 0.0).sum() * torch.sign(step)
        return grad if ctx.needs_input_grad[0] else None, grad_edge, grad_step


def code_dtype(max_abs: int) -> torch.dtype:
    """The narrowest of int8 / int16 / int32 that holds codes in ``[−max_abs, max_abs]``."""
    for dtype in CODE_DTYPES:
        if max_abs <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"codes up to {max_abs} do not fit in int32; the step is far too small")


@torch.no_grad()
def integer_codes(w: torch.Tensor, edge: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The codes ``round(encode(w))`` in the narrowest integer dtype that holds them."""
    c = torch.round(encode(w.float(), edge.float(), step.float()))
    max_abs = int(c.abs().max().item()) if c.numel() else 0
    if max_abs > torch.iinfo(torch.int32).max:
        raise ValueError(f"codes up to {max_abs} do not fit in int32; the step is far too small")
    return c.to(code_dtype(max_abs))


def paper_init(w: torch.Tensor) -> tuple[float, float]:
    """``(e, Δ)`` as the paper starts them: both ``(max − min)/256`` (1.0 for a constant ``w``)."""
    span = float(w.max() - w.min()) if w.numel() else 0.0
    s = span / 256 if span > 0 else 1.0
    return s, s


@torch.no_grad()
def target_init(
    w: torch.Tensor, bits: float, max_samples: int = 1 << 16, iters: int = 40
) -> tuple[float, float]:
    """``(e, Δ)`` of the uniform quantizer (``e = Δ/2``) whose codes of ``w`` have an empirical
    entropy of about ``bits`` per weight, by bisection on ``log Δ``.

    The entropy falls as ``Δ`` grows; bisection keeps the largest ``Δ`` still at or above the
    target, so the result is at most one bisection step away. Tensors above ``max_samples``
    elements are measured on an evenly strided subset (entropy is a per-symbol average).
    """
    flat = w.detach().float().reshape(-1)
    if flat.numel() > max_samples:
        flat = flat[:: math.ceil(flat.numel() / max_samples)]
    peak = float(flat.abs().max()) if flat.numel() else 0.0
    if peak == 0.0:
        return 0.5, 1.0
    lo, hi = math.log(peak * 2.0**-20), math.log(4.0 * peak)  # entropy(lo) ≥ bits ≥ entropy(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        d = torch.tensor(math.exp(mid))
        codes = torch.round(encode(flat, d / 2, d)).to(torch.int64)
        if empirical_entropy(codes) >= bits:
            lo = mid
        else:
            hi = mid
    step = math.exp(lo)
    return step / 2, step
