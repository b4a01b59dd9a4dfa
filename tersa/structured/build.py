"""From a dense layer's shape and the stage's size settings to a structured layer, and back.

``KIND_CLASSES`` is the registry of parameterisations. :func:`spec_for` turns a target fraction or
an explicit rank / block count into a :class:`~tersa.structured.sizes.StructureSpec`;
:func:`make_layer` builds the layer; :func:`layer_record` / :func:`layer_from_record` are the
JSON form the export stores under ``quantization_config.tersa.structured``.
"""

from __future__ import annotations

from typing import Any

import torch

from tersa.structured.base import StructuredLinear
from tersa.structured.layers import BlockDense, BlockShuffle, LowRank
from tersa.structured.sizes import (
    KINDS,
    Kind,
    StructureSpec,
    blockdense_for_fraction,
    blockshuffle_for_fraction,
    lowrank_for_fraction,
)

KIND_CLASSES: dict[Kind, type[StructuredLinear]] = {
    "lowrank": LowRank,
    "blockdense": BlockDense,
    "blockshuffle": BlockShuffle,
}
# BlockDense's block count when only a fraction or a rank is given (the paper's setting).
DEFAULT_BLOCKDENSE_BLOCKS = 4


def spec_for(
    in_features: int,
    out_features: int,
    kind: Kind,
    fraction: float | None = None,
    rank: int | None = None,
    blocks: int | None = None,
    rank_multiple: int = 1,
) -> StructureSpec:
    """The structure of one ``in -> out`` layer: from ``fraction`` (at most that share of the dense
    weight's parameters) or from an explicit ``rank`` (LowRank, BlockDense) / ``blocks``
    (BlockShuffle). BlockDense takes ``blocks`` (default 4) either way.

    :raises ValueError: the sizes do not fit this shape (the message says why).
    """
    n, m = in_features, out_features
    if kind == "blockdense":
        blocks = blocks or DEFAULT_BLOCKDENSE_BLOCKS
    if fraction is not None:
        if kind == "lowrank":
            return lowrank_for_fraction(n, m, fraction, rank_multiple)
        if kind == "blockdense":
            return blockdense_for_fraction(n, m, fraction, blocks or 1, rank_multiple)
        return blockshuffle_for_fraction(n, m, fraction)
    if kind == "blockshuffle":
        return StructureSpec(kind, n, m, blocks=blocks)
    return StructureSpec(kind, n, m, rank=rank, blocks=blocks if kind == "blockdense" else None)


def make_layer(
    spec: StructureSpec,
    bias: bool,
    merge_below: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> StructuredLinear:
    """An (unfitted) structured layer of ``spec``'s kind and sizes."""
    kw: dict[str, Any] = {
        "bias": bias,
        "merge_below": merge_below,
        "device": device,
        "dtype": dtype,
    }
    n, m = spec.in_features, spec.out_features
    if spec.kind == "lowrank":
        return LowRank(n, m, spec.rank or 0, **kw)
    if spec.kind == "blockdense":
        return BlockDense(n, m, spec.rank or 0, spec.blocks or 0, **kw)
    return BlockShuffle(n, m, spec.blocks or 0, **kw)


def layer_spec(layer: StructuredLinear) -> StructureSpec:
    """The :class:`StructureSpec` of a built layer."""
    kind = next(k for k, cls in KIND_CLASSES.items() if type(layer) is cls)
    return StructureSpec(
        kind,
        layer.in_features,
        layer.out_features,
        rank=getattr(layer, "rank", None),
        blocks=getattr(layer, "blocks", None),
    )


def layer_record(layer: StructuredLinear) -> dict[str, Any]:
    """JSON-able ``{"kind", "in_features", "out_features", "rank", "blocks", "bias",
    "merge_below"}`` of a layer (rank / blocks null where the kind has none)."""
    spec = layer_spec(layer)
    return {
        "kind": spec.kind,
        "in_features": spec.in_features,
        "out_features": spec.out_features,
        "rank": spec.rank,
        "blocks": spec.blocks,
        "bias": layer.bias is not None,
        "merge_below": layer.merge_below,
    }


_RECORD_KEYS = ("kind", "in_features", "out_features", "rank", "blocks", "bias", "merge_below")


def layer_from_record(
    record: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> StructuredLinear:
    """Rebuild an (unfitted) layer from :func:`layer_record`'s output.

    :raises ValueError: the record is malformed (missing or unknown keys, wrong types, a kind
        tersa lacks, sizes that do not fit).
    """
    if not isinstance(record, dict) or set(record) != set(_RECORD_KEYS):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"a structured record has exactly the keys {list(_RECORD_KEYS)}, got {got}"
        )
    if record["kind"] not in KINDS:
        raise ValueError(
            f"unknown structured kind {record['kind']!r}; tersa has {', '.join(KINDS)}"
        )
    ints = ("in_features", "out_features", "rank", "blocks", "merge_below")
    for key in ints:
        value = record[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"structured record key '{key}' must be an integer, got {value!r}")
    if not isinstance(record["bias"], bool):
        raise ValueError(
            f"structured record key 'bias' must be true or false, got {record['bias']!r}"
        )
    spec = StructureSpec(
        record["kind"],
        record["in_features"],
        record["out_features"],
        rank=record["rank"],
        blocks=record["blocks"],
    )
    return make_layer(spec, record["bias"], record["merge_below"], device, dtype)
