"""Structured layers in an export: ``quantization_config.tersa.structured``.

Each structured layer ``NAME`` (:mod:`tersa.structured`) is recorded as
``{NAME: {"kind", "in_features", "out_features", "rank", "blocks", "bias", "merge_below"}}`` and
stores its factors' tensors under their module names (``NAME.v.weight``, ``NAME.u.weight``,
``NAME.v.linears.K.weight`` for block-diagonal factors) and ``NAME.bias``. A factor a ``quantize``
stage replaced is an ordinary quantized layer of the export (a config group target or a
``tersa.layers`` entry) at that factor's name. Loading swaps the structured layers in first, so
those names exist when the quantized layers are placed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tersa.export.records import swap_recorded
from tersa.structured.base import StructuredLinear
from tersa.structured.build import layer_from_record, layer_record


def structured_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: record}`` of every structured layer of ``model``."""
    return {n: layer_record(m) for n, m in model.named_modules() if isinstance(m, StructuredLinear)}


def place_structured(model: nn.Module, records: dict[str, Any], where: str) -> None:
    """Replace each recorded layer of ``model`` (the dense linear its architecture has there) by
    an empty structured layer of the record, on that linear's device and dtype.

    :raises ExportError: a name the model lacks or that is not a linear, a malformed record, or
        sizes that disagree with the linear's.
    """
    swap_recorded(
        model,
        records,
        "tersa.structured",
        "structured layer",
        lambda record, w: layer_from_record(record, device=w.device, dtype=w.dtype),
        where,
    )
