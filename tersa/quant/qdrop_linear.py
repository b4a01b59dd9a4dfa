"""``QDropLinear``: the trainable stand-in for a linear while QDrop reconstructs its block.

- Weight: AdaRound soft rounding on a fixed grid (MSE-observer or min-max scale, per channel or
  per group as the scheme says); ``rounding`` ``V [out, in]`` is the only weight parameter.
- Input: per-token dynamic fake quantization with a straight-through gradient, or a static
  per-tensor step learned with LSQ (its gradient scaled by ``1/√(numel·qmax)``), the zero point
  fixed at its min-max value.
- QDrop: while ``dropping`` is on, every input element keeps its quantized value with probability
  ``drop_prob`` and its float value otherwise (``drop_prob = 1``: always quantized, BRECQ-style).

:meth:`harden` returns the :class:`~tersa.quant.qlinear.QuantLinear` with the chosen rounding
and the learned step: the same storage and forward as round-to-nearest.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tersa.quant.adaround import hard_rounding, init_rounding, rectified_sigmoid, rounded_codes
from tersa.quant.observers import mse_weight_qparams
from tersa.quant.primitives import (
    QuantizedWeight,
    compute_qparams,
    expand_groups,
    fake_quantize_per_token,
    qrange,
    weight_qparams,
)
from tersa.quant.qlinear import SMOOTH_KINDS, QuantLinear
from tersa.quant.replace import linear_weight
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.quant.smoothed import input_transform, smooth_input

Observer = Literal["minmax", "mse"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward; its gradient multiplied by ``factor`` (LSQ's step-gradient scaling)."""
    return x * factor + (x - x * factor).detach()


def lsq_fake_quantize(
    x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """LSQ quantize-dequantize with a learnable per-tensor ``step`` (its gradient scaled by
    ``1/√(numel·qmax)``); ``x`` gets the straight-through gradient inside the clamp range."""
    qmin, qmax = qrange(bits)
    s = scale_grad(step.abs().clamp_min(1e-8), 1.0 / math.sqrt(x.numel() * qmax))
    q = round_ste(x / s)
    if zero_point is not None:
        q = q + zero_point
    q = torch.clamp(q, qmin, qmax)
    if zero_point is not None:
        q = q - zero_point
    return q * s


def per_token_ste(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Dynamic per-token fake quantization with a straight-through gradient."""
    return x + (fake_quantize_per_token(x, bits, symmetric) - x).detach()


class QDropLinear(nn.Module):
    """``y = Q(x) Ŵᵀ + b`` with ``x: [..., in]``, ``Ŵ: [out, in]``, learning rounding and steps.

    Computes in float32. :param linear: an ``nn.Linear``, transformers ``Conv1D`` or
    :class:`~tersa.quant.smoothed.SmoothedLinear` (its input transform is kept).
    """

    def __init__(
        self,
        linear: nn.Module,
        weights: WeightScheme | None,
        activations: ActivationScheme | None,
        drop_prob: float = 0.5,
        observer: Observer = "mse",
    ) -> None:
        super().__init__()
        w = linear_weight(linear).detach()
        self.out_features, self.in_features = w.shape
        self.weights, self.activations, self.drop_prob = weights, activations, drop_prob
        self.dtype, self.device = w.dtype, w.device
        self.dropping = False  # QDrop mixing on (reconstruction) or off (evaluation)
        bias = getattr(linear, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        scale, shift = input_transform(linear)
        self.register_buffer("smooth_scale", None if scale is None else scale.detach().float())
        self.register_buffer("smooth_shift", None if shift is None else shift.detach().float())
        if weights is None:
            self.register_buffer("weight", w.float())
            self.rounding = None
        else:
            self._init_rounding(w, weights, observer)
        self.input_step: nn.Parameter | None = None
        self.register_buffer("input_zero_point", None)
        self._obs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._observing = False

    def _init_rounding(self, w: torch.Tensor, scheme: WeightScheme, observer: Observer) -> None:
        # The grid comes from the weight in its own dtype, so the scale is the one stored later.
        qparams = mse_weight_qparams if observer == "mse" else weight_qparams
        scale, zp = qparams(w, scheme)
        self.group_size = scheme.group_size if scheme.granularity == "group" else None
        self.register_buffer("weight_scale", scale)  # compact [1|out, 1|G]
        self.register_buffer("weight_zero_point", None if scheme.symmetric else zp)
        step = expand_groups(
            scale.float(), self.group_size, self.in_features
        )  # broadcasts [out, in]
        ratio = w.float() / step
        floor = torch.floor(ratio)
        self.register_buffer("w_floor", floor)
        self.register_buffer("w_step", step)
        z = None if scheme.symmetric else expand_groups(zp, self.group_size, self.in_features)
        self.register_buffer("w_zero", None if z is None else z.float())
        self.rounding = nn.Parameter(init_rounding(ratio - floor))

    # ---------------------------------------------------------------------------------- weight

    def soft_weight(self, hard: bool = False) -> torch.Tensor:
        """``Ŵ [out, in]`` with ``h(V)`` (soft) or ``1[V ≥ 0]`` (hard) rounding, float32."""
        if self.rounding is None:
            return self.weight
        assert self.weights is not None
        qmin, qmax = qrange(self.weights.bits)
        up = hard_rounding(self.rounding) if hard else rectified_sigmoid(self.rounding)
        codes = rounded_codes(self.w_floor, up, self.w_zero, qmin, qmax)
        if self.w_zero is not None:
            codes = codes - self.w_zero
        return codes * self.w_step

    # ----------------------------------------------------------------------------- activations

    @property
    def is_static(self) -> bool:
        return self.activations is not None and self.activations.granularity == "tensor"

    def start_observing(self) -> None:
        """Until :meth:`init_input_step`, forward records the input's min/max, unquantized."""
        self._observing, self._obs = True, None

    def init_input_step(
        self, x_min: float | torch.Tensor | None = None, x_max: float | torch.Tensor | None = None
    ) -> None:
        """Start the static step at the given range, else at the observed min-max."""
        assert self.activations is not None and self.is_static
        if x_min is None:
            if self._obs is None:
                raise RuntimeError("init_input_step: no inputs were observed")
            x_min, x_max = self._obs
        scale, zp = compute_qparams(
            torch.as_tensor(x_min, dtype=torch.float32),
            torch.as_tensor(x_max, dtype=torch.float32),
            self.activations.bits,
            self.activations.symmetric,
        )
        self.input_step = nn.Parameter(scale.reshape(()).float())
        zero = None if self.activations.symmetric else zp.reshape(()).float()
        self.register_buffer("input_zero_point", zero)
        self._observing, self._obs = False, None

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        act = self.activations
        if act is None:
            return x
        if act.granularity == "token":
            q = per_token_ste(x, act.bits, act.symmetric)
        else:
            if self.input_step is None:
                raise RuntimeError("static input step not initialised: call init_input_step()")
            q = lsq_fake_quantize(x, self.input_step, self.input_zero_point, act.bits)
        if self.dropping and self.drop_prob < 1.0:
            q = torch.where(torch.rand_like(x) < self.drop_prob, q, x)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., in] -> [..., out]`` in ``x``'s dtype, computed in float32."""
        dtype = x.dtype
        x = smooth_input(x.float(), self.smooth_scale, self.smooth_shift)
        if self._observing:
            lo, hi = x.detach().amin(), x.detach().amax()
            if self._obs is not None:
                lo, hi = torch.minimum(lo, self._obs[0]), torch.maximum(hi, self._obs[1])
            self._obs = (lo, hi)
        else:
            x = self._quantize_input(x)
        return F.linear(x, self.soft_weight(), self.bias).to(dtype)

    # -------------------------------------------------------------------------------- harden

    @torch.no_grad()
    def harden(self) -> QuantLinear:
        """The QuantLinear with the hardened rounding ``⌊w/s⌋ + 1[V ≥ 0]`` and the learned step,
        in the source layer's dtype and device."""
        kind = None if self.smooth_scale is None else SMOOTH_KINDS[self.smooth_shift is not None]
        ql = QuantLinear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            self.weights,
            self.activations,
            dtype=self.dtype,
            device=self.device,
            smooth=kind,
        )
        if self.rounding is None:
            ql.weight = nn.Parameter(self.weight.to(self.dtype), requires_grad=False)
        else:
            assert self.weights is not None
            qmin, qmax = qrange(self.weights.bits)
            codes = rounded_codes(
                self.w_floor, hard_rounding(self.rounding), self.w_zero, qmin, qmax
            )
            zp = self.weight_zero_point
            ql.set_quantized_weight(
                QuantizedWeight(
                    codes.to(torch.int8), self.weight_scale, zp, self.group_size, self.weights.bits
                )
            )
        if self.bias is not None:
            ql.bias = nn.Parameter(self.bias.to(self.dtype), requires_grad=False)
        if self.smooth_scale is not None:
            ql.smooth_scale = self.smooth_scale.to(self.dtype)
            if self.smooth_shift is not None:
                ql.smooth_shift = self.smooth_shift.to(self.dtype)
        if self.is_static:
            assert self.input_step is not None
            ql.set_input_qparams(self.input_step.abs(), self._input_zero_code())
        return ql

    def _input_zero_code(self) -> torch.Tensor | None:
        zero = self.input_zero_point
        return None if zero is None else zero.to(torch.int8)
