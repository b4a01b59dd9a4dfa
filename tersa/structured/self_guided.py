"""Self-guided training of a structured layer (StructuredFFN §3.2).

Early in training a dense guide carries the output, ``y = α·dense(x) + (1 − α)·structured(x)``,
and ``α`` decays from 1 to 0 so that the structured layer takes over gradually; trained alone from
the start, low-rank layers show loss spikes and slow convergence. Once ``α`` reaches 0 the guide
is dropped (:meth:`SelfGuided.finalize`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tersa.structured.base import StructuredLinear


def cosine_alpha(step: int, total_steps: int) -> float:
    """``α = 0.5·(1 + cos(π·step / total_steps))``: 1 at step 0, 0 from ``total_steps`` on.

    ``total_steps`` is the guided phase (the paper uses half of training), not all of training.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


class SelfGuided(nn.Module):
    """``y = α·dense(x) + (1 − α)·structured(x)`` for ``x [..., in]`` -> ``[..., out]``.

    At ``α = 0`` only the structured path runs (the dense one is not computed), at ``α = 1`` only
    the dense one (the structured path's gradient would be multiplied by 0 anyway); both ends are
    then exactly the single layer's output.

    :param dense: the guide, ``nn.Linear(in, out)``.
    :param structured: the layer being trained, of the same shape.
    :param alpha: the initial mixing weight in [0, 1].
    """

    def __init__(self, dense: nn.Linear, structured: StructuredLinear, alpha: float = 1.0) -> None:
        super().__init__()
        dims = (dense.in_features, dense.out_features)
        if dims != (structured.in_features, structured.out_features):
            raise ValueError(
                f"dense is {dims[0]} -> {dims[1]} but structured is "
                f"{structured.in_features} -> {structured.out_features}"
            )
        self.dense = dense
        self.structured = structured
        self.alpha = alpha

    @classmethod
    def from_structured(cls, structured: StructuredLinear, alpha: float = 1.0) -> SelfGuided:
        """A guide initialised to the product of ``structured``'s factors (as the paper does).

        The guide gets the structured layer's bias flag, dtype and device; its bias is a copy.
        """
        w = structured.dense_weight().detach()
        bias = structured.bias is not None
        dense = nn.Linear(*w.shape[::-1], bias=bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if structured.bias is not None:
                dense.bias.copy_(structured.bias)
        return cls(dense, structured, alpha)

    @property
    def alpha(self) -> float:
        """The weight of the dense guide, in [0, 1]."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}")
        self._alpha = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        a = self._alpha
        if a == 0.0:
            return self.structured(x)
        if a == 1.0:
            return self.dense(x)
        return a * self.dense(x) + (1.0 - a) * self.structured(x)

    def finalize(self) -> StructuredLinear:
        """The structured layer alone, to put in the model once the guided phase is over."""
        return self.structured

    def extra_repr(self) -> str:
        return f"alpha={self._alpha:.4g}"
