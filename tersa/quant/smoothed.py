"""``SmoothedLinear``: a float linear that smooths its own input, ``y = W·((x − z)/s) + b``.

In a post-norm block (BERT, OPT-350m) the norm output ``X`` also feeds the residual, so the norm
cannot emit ``X̃ = (X − z)/s`` the way a pre-norm group does (:func:`tersa.quant.fold.fold_norm_group`).
The transform moves to the consumers instead: each computes ``X̃`` from ``X`` with two per-channel
buffers, ``smooth_scale`` ``s`` and ``smooth_shift`` ``z`` (or None), and its weight and bias absorb
the inverse (``W ← W·diag(s)``, ``b ← b + W·z``). In float the block is unchanged; a quantizer placed
on the layer (:class:`~tersa.quant.qlinear.QuantLinear` keeps the same buffers) sees ``X̃``.

``SmoothedLinear`` subclasses ``nn.Linear`` so everything that finds, folds or quantizes linears
(``is_linear``, ``linear_weight``, ``fold_into_linear_inputs``, ``QuantLinear.from_float``) handles it.
Exports list unquantized ones under ``quantization_config.smoothed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tersa.quant.replace import linear_weight


def smooth_input(
    x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> torch.Tensor:
    """``(x − z)/s`` over the last dimension of ``x`` ``[..., in]``, computed in float32 (float64
    for float64 inputs) and returned in ``x``'s dtype; ``x`` itself when ``scale`` is None."""
    if scale is None:
        return x
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(dt)
    if shift is not None:
        xs = xs - shift.to(dt)
    return (xs / scale.to(dt)).to(x.dtype)


def input_transform(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A module's ``(smooth_scale, smooth_shift)``; ``(None, None)`` for a plain linear."""
    return getattr(module, "smooth_scale", None), getattr(module, "smooth_shift", None)


def effective_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module``'s weight (and quantizer) multiplies when it is called on ``x``."""
    return smooth_input(x, *input_transform(module))


def effective_range(
    module: nn.Module, x_min: torch.Tensor, x_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``[in]`` range of ``module``'s effective input from that of its raw input
    (exact: the transform is per-channel affine with ``s > 0``)."""
    scale, shift = input_transform(module)
    if scale is None:
        return x_min, x_max
    z = shift.float() if shift is not None else 0.0
    s = scale.float()
    return (x_min.float() - z) / s, (x_max.float() - z) / s


class SmoothedLinear(nn.Linear):
    """``y = F.linear((x − z)/s, W, b)`` with ``x: [..., in]``, ``s, z: [in]``, ``y: [..., out]``.

    :param shift: whether the layer has a ``smooth_shift`` buffer (None otherwise).

    The buffers start as the identity (``s = 1``, ``z = 0``); :meth:`compose` adds a transform.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        shift: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        fp = {"dtype": self.weight.dtype, "device": self.weight.device}
        self.register_buffer("smooth_scale", torch.ones(in_features, **fp))
        self.register_buffer("smooth_shift", torch.zeros(in_features, **fp) if shift else None)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Module, shift: bool = False) -> SmoothedLinear:
        """An identity-smoothed copy of an ``nn.Linear`` or ``Conv1D`` (shares an ``nn.Linear``'s
        weight and bias; a ``Conv1D`` weight is transposed into a new ``[out, in]`` tensor)."""
        w = linear_weight(linear).detach()  # [out, in]
        has_bias = getattr(linear, "bias", None) is not None
        out = cls(*reversed(w.shape), bias=has_bias, shift=shift, device="meta", dtype=w.dtype)
        out.weight = nn.Parameter(w if isinstance(linear, nn.Linear) else w.contiguous(), False)
        if has_bias:
            out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        out.smooth_scale = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        if shift:
            out.smooth_shift = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
        return out

    @torch.no_grad()
    def compose(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """Make the layer's input ``((x − z₁)/s₁ − z)/s``: ``z₁ ← z₁ + s₁·z``, ``s₁ ← s₁·s``.

        Only the buffers change; the caller folds the inverse into the weight and bias
        (:func:`tersa.quant.fold.fold_into_linear_inputs`).
        """
        s1 = self.smooth_scale.double()
        f64 = {"device": s1.device, "dtype": torch.float64}
        if shift is not None:
            z1 = self.smooth_shift.double() if self.smooth_shift is not None else 0.0
            self.smooth_shift = (z1 + s1 * shift.to(**f64)).to(self.smooth_scale)
        if scale is not None:
            self.smooth_scale.copy_((s1 * scale.to(**f64)).to(self.smooth_scale.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            smooth_input(x, self.smooth_scale, self.smooth_shift), self.weight, self.bias
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={self.smooth_shift is not None}"
