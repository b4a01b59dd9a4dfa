"""``StructuredLinear``: the drop-in ``nn.Linear`` base of the structured layers, with pre-merge.

A structured weight is a product of factors, so it is also one dense matrix ``W' [out, in]``. For a
few tokens the dense matmul is faster than the chain of small factor matmuls (kernel launches and
weight reads dominate; the StructuredFFN blog puts the crossover near 16 tokens). ``merge_below``
picks per call: fewer tokens than that use the cached ``W'``, more use the factors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from tersa.structured.factors import BlockDiagonal, is_float_factor
from tersa.structured.fit_math import add_ridge, moment_output_error, output_error, second_moment

# Default damping of the calibration second moment, relative to its mean diagonal: enough to make
# a rank-deficient XᵀX/n (fewer tokens than features, dead channels) invertible, small enough not
# to change the fit of well-conditioned data.
MOMENT_DAMP = 1e-6
# Default alternating-least-squares rounds for block fits with calibration data (each round never
# increases the error; on random 16-24 wide weights the gain levels off within ~10 rounds).
FIT_ITERS = 10


class StructuredLinear(nn.Module, ABC):
    """Base of the structured replacements for ``nn.Linear(in_features, out_features, bias)``.

    ``forward(x [..., in]) -> [..., out]``. Subclasses hold the factors as child modules (bias-free
    ``nn.Linear`` or :class:`~tersa.structured.factors.BlockDiagonal`, so that quantization finds
    and replaces them, see :mod:`tersa.structured.factors`) and implement :meth:`factored`,
    :meth:`dense_weight`, :meth:`weight_parameters` and :meth:`_fit`.

    :param merge_below: token count below which ``forward`` multiplies by the merged dense
        weight instead of the factors; None never merges. Quantized factors always run factored
        (a merged float copy would undo the compression).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        merge_below: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if merge_below is not None and merge_below < 0:
            raise ValueError(f"merge_below must be None or >= 0, got {merge_below}")
        self.in_features = in_features
        self.out_features = out_features
        self.merge_below = merge_below
        b = torch.empty(out_features, device=device, dtype=dtype) if bias else None
        self.bias = None if b is None else nn.Parameter(b)
        # the merged weight and the (data pointer, version) of each factor it was built from
        self._merged: torch.Tensor | None = None
        self._merged_key: tuple[tuple[int, int], ...] = ()

    # ------------------------------------------------------------------ subclass interface

    @abstractmethod
    def factored(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` through the factors, without the bias: ``[..., out]``."""

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The product of the factors, ``W' [out, in]`` (differentiable)."""

    @abstractmethod
    def weight_parameters(self) -> int:
        """Parameters in the factors (the bias excluded)."""

    @abstractmethod
    def _fit(self, w: torch.Tensor, c: torch.Tensor | None, iters: int) -> None:
        """Set the factors from a float64 dense weight ``w [out, in]`` and second moment ``c``."""

    def factors(self) -> list[nn.Parameter]:
        """The float factor parameters (every parameter but the layer's bias)."""
        return [p for name, p in self.named_parameters() if name != "bias"]

    def factor_linears(self) -> list[nn.Module]:
        """Every linear of the factors, in order: an ``nn.Linear`` per dense factor and one per
        block of a block-diagonal one (or whatever quantization put in their place)."""
        out: list[nn.Module] = []
        for child in self.children():
            out.extend(child.linears if isinstance(child, BlockDiagonal) else [child])
        return out

    @property
    def quantized(self) -> bool:
        """Whether any factor linear has been replaced (by a quantized layer)."""
        return not all(is_float_factor(m) for m in self.factor_linears())

    # ------------------------------------------------------------------ forward and pre-merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``, by the merged weight when ``tokens < merge_below``."""
        if self.merge_below is not None and x.numel() < self.merge_below * self.in_features:
            key = self._merge_key()
            if key is not None:  # float factors (quantized ones compute through their kernels)
                return F.linear(x, self._merged_for(key), self.bias)
        out = self.factored(x)
        return out if self.bias is None else out + self.bias

    def merged_weight(self) -> torch.Tensor:
        """``W' [out, in]``, cached while the factors are unchanged.

        The cache key is each factor's storage and in-place version counter, so optimizer steps,
        ``load_state_dict``, device moves and replaced factors rebuild it. When autograd needs
        gradients of the factors the product is recomputed (uncached) so that they flow through it.
        """
        key = self._merge_key()
        return self.dense_weight() if key is None else self._merged_for(key)

    def _merge_key(self) -> tuple[tuple[int, int], ...] | None:
        """``(storage, version)`` of every factor weight, or None when a factor is not a float linear.

        One pass over the factor linears' own attributes: this runs on every pre-merged call, where
        a ``named_parameters`` walk would cost more than a one-token matmul.
        """
        key = []
        for m in self.factor_linears():
            if not is_float_factor(m):
                return None
            key.append((m.weight.data_ptr(), m.weight._version))
        return tuple(key)

    def _merged_for(self, key: tuple[tuple[int, int], ...]) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.factors()):
            return self.dense_weight()
        if self._merged is None or key != self._merged_key:
            with torch.no_grad():
                self._merged = self.dense_weight()
            self._merged_key = key
        return self._merged

    # ------------------------------------------------------------------ sizes

    def num_parameters(self) -> int:
        """:meth:`weight_parameters` plus ``out_features`` for the bias."""
        return self.weight_parameters() + (0 if self.bias is None else self.out_features)

    def flops_per_token(self, merged: bool = False) -> int:
        """Floating-point operations per token: ``2·weight_parameters`` (one multiply and one add
        per weight) plus ``out_features`` for the bias; ``merged``: ``2·in·out`` (+ bias)."""
        macs = self.in_features * self.out_features if merged else self.weight_parameters()
        return 2 * macs + (0 if self.bias is None else self.out_features)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_from_dense(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        *,
        damp: float = MOMENT_DAMP,
        iters: int = FIT_ITERS,
    ) -> float:
        """Fit the factors to a dense ``weight [out, in]`` and return the relative output error.

        :param bias: ``[out]``, copied into the layer's bias (None zeroes it).
        :param x: calibration inputs ``[..., in]``: fit ``||X W'ᵀ - X Wᵀ||`` instead of
            ``||W' - W||`` (through the second moment ``XᵀX/n``, damped by ``damp`` · its mean
            diagonal).
        :param iters: alternating least-squares rounds (block layers, with ``x`` only).
        :returns: ``||X W'ᵀ - X Wᵀ|| / ||X Wᵀ||`` (Frobenius; ``X = I`` without ``x``).
        """
        self._check_fit(weight, bias)
        if x is not None and x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}], got {list(x.shape)}")
        c = None if x is None else second_moment(x.to(weight.device), damp)
        self._fit(weight.detach().to(torch.float64), c, iters)
        self._set_bias(bias)
        return output_error(weight, self.dense_weight(), x)

    @torch.no_grad()
    def init_from_moment(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        moment: torch.Tensor,
        *,
        damp: float = MOMENT_DAMP,
        iters: int = FIT_ITERS,
    ) -> float:
        """:meth:`init_from_dense` from the inputs' second moment ``XᵀX/n`` ``[in, in]`` (undamped)
        instead of the inputs: the fits only need the moment, which a calibration pass can
        accumulate without keeping any token. Returns the same relative output error."""
        self._check_fit(weight, bias)
        n = self.in_features
        if tuple(moment.shape) != (n, n):
            raise ValueError(f"moment must be [in, in] = [{n}, {n}], got {list(moment.shape)}")
        c = moment.to(weight.device, torch.float64)
        self._fit(weight.detach().to(torch.float64), add_ridge(c, damp), iters)
        self._set_bias(bias)
        return moment_output_error(weight, self.dense_weight(), c)

    def _check_fit(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        shape = (self.out_features, self.in_features)
        if self.quantized:
            raise ValueError("cannot fit a structured layer whose factors are quantized")
        if tuple(weight.shape) != shape:
            raise ValueError(f"weight must be [out, in] = {list(shape)}, got {list(weight.shape)}")
        if bias is not None and (self.bias is None or tuple(bias.shape) != shape[:1]):
            raise ValueError(
                f"bias {list(bias.shape)} does not fit a layer with "
                f"{'no bias' if self.bias is None else f'bias [{self.out_features}]'}"
            )

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def reset_bias(self) -> None:
        """``nn.Linear``'s bias init: uniform in ``±1/√in``."""
        if self.bias is not None:
            bound = 1.0 / max(self.in_features, 1) ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)
