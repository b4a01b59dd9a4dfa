"""``QuantLinear``: a linear layer with packed integer weights and (optionally) quantized inputs.

Its state dict is the exported format, with compressed-tensors names: ``weight_packed`` (int32,
see :func:`~tersa.quant.primitives.pack_int32`), ``weight_scale``, ``weight_zero_point``
(asymmetric only), ``bias``, and for static activations ``input_scale`` / ``input_zero_point``.
Without a weight scheme the float ``weight`` is kept (activation-only quantization). A layer made
from a :class:`~tersa.quant.smoothed.SmoothedLinear` (post-norm outlier transforms) also keeps its
input transform, ``smooth_scale`` and optionally ``smooth_shift`` ``[in]``: the input becomes
``(x − z)/s`` before it is quantized.

``forward`` runs a fused kernel for W4A16 and W8A8 layers (:mod:`tersa.quant.qlinear_dispatch`);
otherwise it is the fake-quant reference: it dequantizes the weight and fake-quantizes the input,
then calls ``F.linear``. The kernels compute the same function (up to float rounding).

A model can be built on the ``meta`` device with QuantLinears (from ``scheme_dict`` records) and
filled with ``load_state_dict(..., assign=True)``.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tersa.quant.primitives import (
    QuantizedWeight,
    compute_qparams,
    dequantize_weight,
    fake_quantize_per_token,
    fake_quantize_static,
    pack_int32,
    packed_width,
    quantize_weight,
    scale_shape,
    unpack_int32,
)
from tersa.quant.qlinear_dispatch import run_kernel, select_path
from tersa.quant.replace import linear_weight
from tersa.quant.scheme import (
    ActivationScheme,
    WeightScheme,
    describe_activation,
    describe_weight,
)
from tersa.quant.smoothed import input_transform, smooth_input

SmoothKind = Literal["scale", "scale_shift"]
SMOOTH_KINDS: tuple[SmoothKind, SmoothKind] = ("scale", "scale_shift")  # indexed by "has a shift"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16 GEMM on CPU is ~400x slower than fp32 (style.md 3.3); upcast there, keep it elsewhere.
    if x.dtype == torch.float16 and x.device.type == "cpu":
        return torch.float32
    return x.dtype


class QuantLinear(nn.Module):
    """Quantized ``y = x Wᵀ + b`` with ``x: [..., in]``, ``W: [out, in]``, ``y: [..., out]``.

    :param weights: weight scheme, or None to keep the float weight.
    :param activations: input scheme, or None for float inputs. ``granularity="tensor"`` is static
        (``input_scale`` from :meth:`start_calibration` / :meth:`finish_calibration` or a state
        dict); ``"token"`` is dynamic per token and needs no calibration.
    :param dtype: dtype of the float tensors (scales, bias, float weight).
    :param smooth: the input transform applied before quantization: None, ``"scale"``
        (``x/s``) or ``"scale_shift"`` (``(x − z)/s``), see :mod:`tersa.quant.smoothed`.

    Buffers are created uninitialised; fill them with :meth:`from_float` or ``load_state_dict``.
    Weight and bias do not require grad: this is an inference module.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weights: WeightScheme | None,
        activations: ActivationScheme | None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        smooth: SmoothKind | None = None,
    ) -> None:
        super().__init__()
        if smooth not in (None, *SMOOTH_KINDS):
            raise ValueError(f"smooth must be None, 'scale' or 'scale_shift', got {smooth!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.activations = weights, activations
        self.group_size = weights.group_size if weights and weights.granularity == "group" else None
        fp = {"dtype": dtype, "device": device}
        if weights is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **fp), False)
        else:
            n_words = packed_width(in_features, weights.bits)
            packed = torch.empty(out_features, n_words, dtype=torch.int32, device=device)
            self.register_buffer("weight_packed", packed)
            shape = scale_shape(out_features, in_features, weights)
            self.register_buffer("weight_scale", torch.empty(shape, **fp))
            if not weights.symmetric:
                zp = torch.empty(shape, dtype=torch.int8, device=device)
                self.register_buffer("weight_zero_point", zp)
        b = nn.Parameter(torch.empty(out_features, **fp), False) if bias else None
        self.register_parameter("bias", b)
        self.smooth = smooth
        scale = torch.ones(in_features, **fp) if smooth else None
        self.register_buffer("smooth_scale", scale)
        shift = torch.zeros(in_features, **fp) if smooth == "scale_shift" else None
        self.register_buffer("smooth_shift", shift)
        if self.is_static:
            self.register_buffer("input_scale", torch.empty(1, **fp))
            if not self.activations.symmetric:
                zp = torch.empty(1, dtype=torch.int8, device=device)
                self.register_buffer("input_zero_point", zp)
        # Static input qparams are valid once calibrated or loaded; until then forward refuses.
        self._has_input_qparams = False
        self._calibrating = False
        self._obs: tuple[torch.Tensor, torch.Tensor] | None = None  # running (min, max) of inputs
        self._codes_cache: tuple[weakref.ref, int, torch.Tensor] | None = None

    @property
    def is_static(self) -> bool:
        """Whether inputs use a static, calibrated per-tensor scale."""
        return self.activations is not None and self.activations.granularity == "tensor"

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_float(
        cls,
        linear: nn.Module,
        weights: WeightScheme | None,
        activations: ActivationScheme | None,
    ) -> QuantLinear:
        """RTN-quantize an ``nn.Linear`` or transformers ``Conv1D``, keeping its dtype and device.

        With ``weights=None`` the new module shares the source's weight storage (``nn.Linear``).
        Static activations still need calibration (or :meth:`set_input_range`) before the module
        can run quantized. A :class:`~tersa.quant.smoothed.SmoothedLinear`'s input transform is
        kept (copied).
        """
        w = linear_weight(linear).detach()  # [out, in]
        out_f, in_f = w.shape
        has_bias = getattr(linear, "bias", None) is not None
        smooth_scale, smooth_shift = input_transform(linear)
        kind = None if smooth_scale is None else SMOOTH_KINDS[smooth_shift is not None]
        ql = cls(
            in_f, out_f, has_bias, weights, activations, dtype=w.dtype, device=w.device, smooth=kind
        )
        if smooth_scale is not None:
            ql.smooth_scale = smooth_scale.detach().clone()
            if smooth_shift is not None:
                ql.smooth_shift = smooth_shift.detach().clone()
        if weights is None:
            ql.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        else:
            ql.set_quantized_weight(quantize_weight(w, weights))
        if has_bias:
            ql.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return ql

    def set_quantized_weight(self, qw: QuantizedWeight) -> None:
        """Store ``qw`` (codes ``[out, in]``, scale and zero point of :func:`scale_shape`), e.g. the
        hardened rounding of a reconstruction, instead of the round-to-nearest weight."""
        if self.weights is None:
            raise RuntimeError("set_quantized_weight: this layer keeps a float weight")
        want = (self.out_features, self.in_features)
        if tuple(qw.codes.shape) != want or qw.scale.shape != self.weight_scale.shape:
            raise ValueError(
                f"quantized weight codes {tuple(qw.codes.shape)} / scale {tuple(qw.scale.shape)} "
                f"do not match the layer's {want} / {tuple(self.weight_scale.shape)}"
            )
        self.weight_packed = pack_int32(qw.codes, self.weights.bits)
        self.weight_scale = qw.scale.to(self.weight_scale.dtype)
        if not self.weights.symmetric:
            assert qw.zero_point is not None
            self.weight_zero_point = qw.zero_point.to(torch.int8)

    def scheme_dict(self) -> dict[str, Any]:
        """JSON-able ``{"weights": {...} | None, "activations": {...} | None}`` for the export,
        plus ``"smooth": "scale" | "scale_shift"`` when the layer has an input transform."""
        d: dict[str, Any] = {
            "weights": dataclasses.asdict(self.weights) if self.weights else None,
            "activations": dataclasses.asdict(self.activations) if self.activations else None,
        }
        if self.smooth is not None:
            d["smooth"] = self.smooth
        return d

    @classmethod
    def from_scheme_dict(
        cls,
        d: dict[str, Any],
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        """Rebuild an empty module from a :meth:`scheme_dict` record (then ``load_state_dict``)."""
        w, a = d.get("weights"), d.get("activations")
        weights = WeightScheme(**w) if w is not None else None
        activations = ActivationScheme(**a) if a is not None else None
        smooth = d.get("smooth")
        return cls(in_features, out_features, bias, weights, activations, dtype, device, smooth)

    # ------------------------------------------------------------------------------------ weight

    def _codes(self) -> torch.Tensor:
        """Unpacked int8 codes ``[out, in]``, cached until ``weight_packed`` is replaced/edited."""
        packed = self.weight_packed
        cache = self._codes_cache
        if cache is not None and cache[0]() is packed and cache[1] == packed._version:
            return cache[2]
        assert self.weights is not None
        codes = unpack_int32(packed, self.weights.bits, self.in_features)
        self._codes_cache = (weakref.ref(packed), packed._version, codes)
        return codes

    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` as the forward uses it, in the scale's dtype."""
        if self.weights is None:
            return self.weight
        zp = self.weight_zero_point if not self.weights.symmetric else None
        qw = QuantizedWeight(
            self._codes(), self.weight_scale, zp, self.group_size, self.weights.bits
        )
        return dequantize_weight(qw)

    # ------------------------------------------------------------------------------- calibration

    def start_calibration(self) -> None:
        """Record input ranges: until :meth:`finish_calibration`, forward observes the input's
        min/max (over all tokens) and does not quantize it (the weight stays quantized)."""
        if not self.is_static:
            raise RuntimeError(
                f"start_calibration: activations '{self._act_tag()}' are not static "
                "(granularity 'tensor'); nothing to calibrate"
            )
        self._calibrating, self._obs = True, None

    def finish_calibration(self) -> None:
        """Set ``input_scale`` (and ``input_zero_point``) from the observed min/max."""
        if not self._calibrating:
            raise RuntimeError("finish_calibration called without start_calibration")
        if self._obs is None:
            raise RuntimeError(
                "finish_calibration: no inputs were observed; run forward on calibration data "
                "between start_calibration() and finish_calibration()"
            )
        assert self.activations is not None
        x_min, x_max = self._obs
        scale, zp = compute_qparams(
            x_min, x_max, self.activations.bits, self.activations.symmetric, self.input_scale.dtype
        )
        with torch.no_grad():
            self.input_scale.copy_(scale.reshape(1))
            if not self.activations.symmetric:
                self.input_zero_point.copy_(zp.reshape(1))
        self._calibrating, self._obs, self._has_input_qparams = False, None, True

    def set_input_range(self, x_min: float | torch.Tensor, x_max: float | torch.Tensor) -> None:
        """Set static ``input_scale`` (and zero point) from a given range of the quantizer's input
        (after the smoothing transform), instead of calibrating: e.g. a clipped range chosen by
        token-wise clipping."""
        if not self.is_static:
            raise RuntimeError(
                f"set_input_range: activations '{self._act_tag()}' are not static "
                "(granularity 'tensor'); per-token scales have no fixed range"
            )
        assert self.activations is not None
        scale, zp = compute_qparams(
            torch.as_tensor(x_min, dtype=torch.float32),
            torch.as_tensor(x_max, dtype=torch.float32),
            self.activations.bits,
            self.activations.symmetric,
            self.input_scale.dtype,
        )
        with torch.no_grad():
            self.input_scale.copy_(scale.reshape(1))
            if not self.activations.symmetric:
                self.input_zero_point.copy_(zp.reshape(1))
        self._calibrating, self._obs, self._has_input_qparams = False, None, True

    def set_input_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Set static ``input_scale`` (and ``input_zero_point``) directly, e.g. steps learned by a
        reconstruction."""
        if not self.is_static:
            raise RuntimeError(
                f"set_input_qparams: activations '{self._act_tag()}' are not static "
                "(granularity 'tensor')"
            )
        assert self.activations is not None
        with torch.no_grad():
            self.input_scale.copy_(scale.detach().reshape(1))
            if not self.activations.symmetric:
                assert zero_point is not None
                self.input_zero_point.copy_(zero_point.detach().reshape(1))
        self._calibrating, self._obs, self._has_input_qparams = False, None, True

    def _observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x_min, x_max = x.detach().amin().float(), x.detach().amax().float()
        if self._obs is not None:
            x_min, x_max = torch.minimum(x_min, self._obs[0]), torch.maximum(x_max, self._obs[1])
        self._obs = (x_min, x_max)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "input_scale" in state_dict:
            self._has_input_qparams = True

    # ----------------------------------------------------------------------------------- forward

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        act = self.activations
        if act is None:
            return x
        if act.granularity == "token":
            return fake_quantize_per_token(x, act.bits, act.symmetric)
        if not self._has_input_qparams:
            raise RuntimeError(
                "static activations are not calibrated: call start_calibration(), run forward on "
                "calibration data, then finish_calibration() (or load a state dict with "
                "input_scale)"
            )
        zp = self.input_zero_point if not act.symmetric else None
        return fake_quantize_static(x, self.input_scale, zp, act.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., in] -> [..., out]`` in ``x``'s dtype.

        W4A16 and W8A8 (symmetric per-channel weights, per-token inputs) layers run their fused
        kernel (Triton on CUDA, torch elsewhere; :mod:`tersa.quant.qlinear_dispatch`); the others,
        calibration and calls that need autograd run the fake-quant reference below.
        """
        x = smooth_input(x, self.smooth_scale, self.smooth_shift)
        path = select_path(self, x)
        if path != "fake_quant":
            return run_kernel(self, x, path)
        if self._calibrating:
            self._observe(x)
        else:
            x = self._quantize_input(x)
        dt = _compute_dtype(x)
        w = self.dequantized_weight().to(dt)
        b = self.bias.to(dt) if self.bias is not None else None
        return F.linear(x.to(dt), w, b).to(x.dtype)

    # ------------------------------------------------------------------------------------ report

    def storage_bytes(self) -> int:
        """Bytes of the persistent tensors (packed weight, scales, zero points, bias, ...)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _act_tag(self) -> str:
        return describe_activation(self.activations) if self.activations else "none"

    def extra_repr(self) -> str:
        w_tag = describe_weight(self.weights) if self.weights else "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weights={w_tag}, activations={self._act_tag()}"
            + (f", smooth={self.smooth}" if self.smooth else "")
        )

    def __getstate__(self) -> dict[str, Any]:
        # weakrefs do not pickle; the cache is rebuilt on the next forward.
        state = self.__dict__.copy()
        state["_codes_cache"] = None
        return state
