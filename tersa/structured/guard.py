"""Refusals where another stage meets a structured layer it cannot transform.

The outlier transforms (``smoothquant``, ``outlier_suppression``, ``os_plus``) fold per-channel
scales into the input columns and output rows of dense linears; a structured layer has neither as
one matrix, and skipping it would silently leave its group untransformed. Recipes catch the order
before any work (``follows`` on the ``structured_ffn`` stage); this catches library use.
"""

from __future__ import annotations

from torch import nn

from tersa.errors import ModelError
from tersa.structured.base import StructuredLinear

STRUCTURED_STAGE = "structured_ffn"


def structured_layers(model: nn.Module) -> dict[str, StructuredLinear]:
    """``{name: layer}`` of every structured layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StructuredLinear)}


def refuse_structured(model: nn.Module, stage: str) -> None:
    """Raise :class:`ModelError` when ``model`` has structured layers ``stage`` cannot handle."""
    found = structured_layers(model)
    if found:
        name, layer = next(iter(found.items()))
        raise ModelError(
            f"{stage} cannot transform structured layers: '{name}' is a {type(layer).__name__} "
            f"({len(found)} structured layers in all); run {stage} before {STRUCTURED_STAGE}"
        )
