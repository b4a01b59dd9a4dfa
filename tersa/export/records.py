"""Swapping recorded layers into a freshly built model: the step :mod:`tersa.export.structured`
and :mod:`tersa.export.l2` share.

A record names a linear of the architecture (``NAME``) and says what replaces it; the replacement
must have that linear's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tersa.errors import ExportError
from tersa.quant.replace import is_linear, linear_weight, replace_linear


def swap_recorded(
    model: nn.Module,
    records: dict[str, Any],
    key: str,
    label: str,
    make: Callable[[Any, torch.Tensor], nn.Module],
    where: str,
) -> None:
    """Replace each linear ``records`` names by ``make(record, its weight)``.

    :param key: the config key, for messages (``tersa.structured``).
    :param label: what a record describes, for messages (``structured layer``).
    :param make: builds the empty replacement; raises ``ValueError`` on a malformed record.
    :raises ExportError: a name the model lacks or that is not a linear, a malformed record, or
        sizes that disagree with the linear's.
    """
    for name, record in records.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ExportError(
                f"'{where}': {key} names '{name}', which this {type(model).__name__} does not have"
            ) from None
        if not is_linear(dense):
            raise ExportError(
                f"'{where}': {key} names '{name}', a {type(dense).__name__}, not a linear"
            )
        w = linear_weight(dense)
        try:
            layer = make(record, w)
        except ValueError as e:
            raise ExportError(f"'{where}': {label} '{name}' is invalid: {e}") from None
        if (layer.out_features, layer.in_features) != tuple(w.shape):
            raise ExportError(
                f"'{where}': {label} '{name}' is {layer.in_features} -> {layer.out_features} "
                f"but the model's layer is {w.shape[1]} -> {w.shape[0]}"
            )
        replace_linear(model, name, layer)
