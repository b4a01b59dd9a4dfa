"""Quantization schemes: how weights and activations are mapped to integers.

Conventions shared by every quantizer in tersa (they match compressed-tensors):

- Integer codes are signed: ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` for ``b`` bits, held in ``int8`` tensors.
- Dequantization is ``x̂ = (q - z) · s`` with scale ``s`` (float) and zero point ``z`` (int8 code);
  symmetric schemes have ``z = 0`` and store no zero point.
- Symmetric: ``s = max|x| / (2^(b-1) - 1)``. Asymmetric: ``s = (max(x, 0) - min(x, 0)) / (2^b - 1)``,
  ``z = -2^(b-1) - round(min(x, 0) / s)`` so that 0 is exactly representable.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from tersa.config import STRICT, Bool, Int


@dataclass(config=STRICT)
class WeightScheme:
    """Weight quantization: bits, granularity and symmetry."""

    bits: Annotated[Int, Field(ge=2, le=8, description="bits per weight, 2 to 8")] = 8
    granularity: Annotated[
        Literal["tensor", "channel", "group"],
        Field(description="one scale per tensor, per output channel, or per group of inputs"),
    ] = "channel"
    group_size: Annotated[
        Int | None,
        Field(
            ge=8, description="inputs per group (granularity: group); a last group may be shorter"
        ),
    ] = None
    symmetric: Annotated[Bool, Field(description="symmetric (no zero point) or asymmetric")] = True

    def __post_init__(self) -> None:
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size (for example 128)")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(
                f"group_size is only allowed with granularity 'group' (got '{self.granularity}')"
            )


@dataclass(config=STRICT)
class ActivationScheme:
    """Activation (linear input) quantization."""

    bits: Annotated[Int, Field(ge=4, le=8, description="bits per activation, 4 to 8")] = 8
    granularity: Annotated[
        Literal["tensor", "token"],
        Field(description="tensor: static min-max calibrated scale; token: dynamic per token"),
    ] = "token"
    symmetric: Annotated[Bool, Field(description="symmetric (no zero point) or asymmetric")] = True


def describe_weight(scheme: WeightScheme) -> str:
    """A short tag such as ``w4-g128-asym`` for tables and logs."""
    gran = {"tensor": "t", "channel": "c"}.get(scheme.granularity, f"g{scheme.group_size}")
    return f"w{scheme.bits}-{gran}-{'sym' if scheme.symmetric else 'asym'}"


def describe_activation(scheme: ActivationScheme) -> str:
    """A short tag such as ``a8-token-sym``."""
    return f"a{scheme.bits}-{scheme.granularity}-{'sym' if scheme.symmetric else 'asym'}"
