"""L2 layers in an export: ``quantization_config.tersa.l2``.

Each :class:`~tersa.compress.l2.layer.L2Linear` in place of the linear ``NAME`` is recorded as
``{NAME: {"in_features", "out_features", "bias", "codes_dtype"}}`` (``codes_dtype``: ``int8``,
``int16`` or ``int32``) and stores ``NAME.weight_codes`` ``[out, in]`` in that dtype,
``NAME.edge`` and ``NAME.step`` ``[1]`` and, with a bias, ``NAME.bias`` ``[out]`` (floats in the
model's dtype). The weight is ``0`` for code 0 and ``sign(k)(|e| + (|k| − ½)|Δ|)`` for code ``k``,
computed in float32. Loaders place these layers after the structured layers (an L2 layer may be a
structured layer's factor) and the added biases.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tersa.compress.l2.layer import L2Linear
from tersa.export.records import swap_recorded

CODE_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}
_KEYS = {"in_features": int, "out_features": int, "bias": bool, "codes_dtype": str}


def l2_record(layer: L2Linear) -> dict[str, Any]:
    """The config record of one L2 layer."""
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "codes_dtype": str(layer.weight_codes.dtype).removeprefix("torch."),
    }


def l2_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: record}`` of every L2 layer of ``model``."""
    return {n: l2_record(m) for n, m in model.named_modules() if isinstance(m, L2Linear)}


def layer_from_record(record: Any, dtype: torch.dtype) -> L2Linear:
    """An empty (meta) L2 layer of ``record``; ``ValueError`` naming what is wrong with it."""
    if not isinstance(record, dict) or set(record) != set(_KEYS):
        keys = sorted(record) if isinstance(record, dict) else record
        raise ValueError(f"expected the keys {', '.join(_KEYS)}, got {keys}")
    for key, kind in _KEYS.items():
        value = record[key]
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            raise ValueError(
                f"'{key}' is {value!r}, not a {'positive int' if kind is int else kind.__name__}"
            )
    if record["codes_dtype"] not in CODE_DTYPES:
        raise ValueError(
            f"codes_dtype '{record['codes_dtype']}' is not one of {', '.join(CODE_DTYPES)}"
        )
    return L2Linear(
        record["in_features"],
        record["out_features"],
        record["bias"],
        CODE_DTYPES[record["codes_dtype"]],
        dtype,
        device="meta",
    )


def place_l2(model: nn.Module, records: dict[str, Any], where: str) -> None:
    """Replace each recorded linear of ``model`` by an empty L2 layer of its record, in that
    linear's dtype.

    :raises ExportError: a name the model lacks or that is not a linear, a malformed record, or
        sizes that disagree with the linear's.
    """
    swap_recorded(
        model,
        records,
        "tersa.l2",
        "L2 layer",
        lambda record, w: layer_from_record(record, w.dtype),
        where,
    )
