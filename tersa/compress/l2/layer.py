"""The L2 layers: :class:`L2Linear` stores integer codes, :class:`L2TrainLinear` learns them.

:class:`L2TrainLinear` is what the ``l2`` stage trains: a float copy of the weight plus ``log e``
and ``log Δ`` (learned in log space, so that one learning rate is a relative change for layers of
any scale and both stay positive), used through straight-through EdgeScale rounding.
:meth:`L2TrainLinear.harden` turns it into the :class:`L2Linear` an export holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tersa.compress.l2.edgescale import decode, encode, fake_quantize, integer_codes
from tersa.compress.l2.rate import Kernel, empirical_entropy, estimated_bits, sample_indices
from tersa.quant.replace import linear_weight

# The decoded weight's key: the buffers themselves (held, so compared by identity), their
# in-place version counters and the dtype asked for.
_CacheKey = tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int], torch.dtype]


class L2Linear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ = decode(codes, e, Δ)``; ``x: [..., in]``, ``y: [..., out]``.

    Buffers: ``weight_codes`` ``[out, in]`` (int8, int16 or int32: the narrowest that holds them),
    ``edge`` and ``step`` ``[1]`` in ``dtype``; ``bias`` ``[out]`` (a parameter, or None). The
    decoded weight is cached per compute dtype and device until a buffer changes (``edge`` and
    ``step`` are decoded in float32 either way). An inference module: nothing requires grad.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        codes_dtype: torch.dtype = torch.int8,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        codes = torch.empty(out_features, in_features, dtype=codes_dtype, device=device)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("edge", torch.empty(1, dtype=dtype, device=device))
        self.register_buffer("step", torch.empty(1, dtype=dtype, device=device))
        b = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        self._cached: tuple[_CacheKey, torch.Tensor] | None = None

    def decoded_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Ŵ`` ``[out, in]`` in ``dtype`` (default: that of ``edge``), cached."""
        dtype = dtype or self.edge.dtype
        codes, edge, step = self.weight_codes, self.edge, self.step
        versions = (codes._version, edge._version, step._version)
        cached = self._cached
        if cached is not None:
            (c, e, s, v, d), w = cached
            if c is codes and e is edge and s is step and v == versions and d == dtype:
                return w
        w = decode(codes.float(), edge.float(), step.float()).to(dtype)
        self._cached = ((codes, edge, step, versions, dtype), w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.decoded_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._cached = None  # device and dtype moves rebuild the decoded weight
        return super()._apply(fn, recurse)

    def entropy(self) -> float:
        """Empirical entropy of the codes, bits per weight."""
        return empirical_entropy(self.weight_codes)

    def prune_fraction(self) -> float:
        """Share of weights whose code is 0."""
        return float((self.weight_codes == 0).double().mean())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, codes={str(self.weight_codes.dtype).removeprefix('torch.')}"
        )


class L2TrainLinear(nn.Module):
    """A linear whose weight passes through straight-through EdgeScale rounding, for training.

    ``weight`` ``[out, in]`` and ``bias`` are float32 copies of the wrapped linear's (a
    transformers ``Conv1D``'s weight is transposed to ``[out, in]``); ``log_edge`` and
    ``log_step`` are scalars. Which of them learn is up to the caller (``requires_grad``).
    """

    def __init__(self, linear: nn.Module, edge: float, step: float) -> None:
        super().__init__()
        w = linear_weight(linear).detach()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.dtype = w.dtype
        self.weight = nn.Parameter(w.float().clone())
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.log_edge = nn.Parameter(torch.tensor(math.log(edge), device=w.device))
        self.log_step = nn.Parameter(torch.tensor(math.log(step), device=w.device))

    @property
    def edge(self) -> torch.Tensor:
        return self.log_edge.exp()

    @property
    def step(self) -> torch.Tensor:
        return self.log_step.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.edge, self.step), self.bias)

    def estimated_bits(
        self, width: float, kernel: Kernel, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Differentiable estimate of the bits per weight of the rounded codes, on a random
        sample of the weights when there are more than ``128²`` (see :mod:`~.rate`)."""
        w = self.weight.reshape(-1)
        idx = sample_indices(w.numel(), generator)
        w = w if idx is None else w[idx.to(w.device)]
        return estimated_bits(encode(w, self.edge, self.step), width, kernel)

    @torch.no_grad()
    def entropy(self, stride: int = 1) -> float:
        """Empirical entropy of the rounded codes now, bits per weight (of every ``stride``-th
        weight: the entropy is a per-symbol average, so a strided subset is a cheap estimate)."""
        w = self.weight.reshape(-1)[::stride]
        return empirical_entropy(torch.round(encode(w, self.edge, self.step)).to(torch.int64))

    @torch.no_grad()
    def harden(self, dtype: torch.dtype | None = None) -> L2Linear:
        """The :class:`L2Linear` of the current codes, ``edge`` and ``step`` in ``dtype``
        (default: the wrapped linear's). ``e`` and ``Δ`` are rounded to ``dtype`` first and the
        codes taken against the rounded values, so the stored layer decodes to the weights
        training last saw up to that rounding."""
        dtype = dtype or self.dtype
        edge, step = self.edge.to(dtype).float(), self.step.to(dtype).float()
        codes = integer_codes(self.weight, edge, step)
        device = self.weight.device
        layer = L2Linear(
            self.in_features, self.out_features, self.bias is not None, codes.dtype, dtype, device
        )
        layer.weight_codes.copy_(codes)
        layer.edge.copy_(edge.reshape(1))
        layer.step.copy_(step.reshape(1))
        if self.bias is not None:
            assert layer.bias is not None
            layer.bias.copy_(self.bias)
        return layer
