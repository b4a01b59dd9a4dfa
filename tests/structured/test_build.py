"""Sizes from the stage's settings, and the export record of a layer and back."""

from __future__ import annotations

import pytest

from tersa.structured.build import layer_from_record, layer_record, make_layer, spec_for
from tersa.structured.sizes import StructureSpec


def test_sizes_from_fraction_or_explicit() -> None:
    assert spec_for(576, 1536, "lowrank", fraction=0.63, rank_multiple=8).rank == 256
    bd = spec_for(576, 1536, "blockdense", fraction=0.32, rank_multiple=8)
    assert (bd.rank, bd.blocks) == (168, 4) and bd.fraction <= 0.32  # blocks default to 4
    assert spec_for(64, 176, "blockshuffle", fraction=0.5).blocks == 4
    assert spec_for(64, 176, "lowrank", rank=7) == StructureSpec("lowrank", 64, 176, rank=7)
    assert spec_for(64, 176, "blockdense", rank=8, blocks=2).blocks == 2
    assert spec_for(64, 176, "blockshuffle", blocks=2).blocks == 2


def test_sizes_that_do_not_fit_say_why() -> None:
    with pytest.raises(ValueError, match=r"^BlockShuffle: blocks=3 must divide in_features=64"):
        spec_for(64, 176, "blockshuffle", blocks=3)
    with pytest.raises(ValueError, match=r"^fraction=0\.001 is too small for LowRank"):
        spec_for(64, 176, "lowrank", fraction=0.001)


@pytest.mark.parametrize(
    "spec",
    [
        StructureSpec("lowrank", 12, 18, rank=4),
        StructureSpec("blockdense", 12, 18, rank=4, blocks=2),
        StructureSpec("blockshuffle", 12, 18, blocks=3),
    ],
    ids=lambda s: s.kind,
)
def test_record_round_trip(spec: StructureSpec) -> None:
    layer = make_layer(spec, bias=True, merge_below=16)
    record = layer_record(layer)
    assert record["kind"] == spec.kind and record["merge_below"] == 16 and record["bias"] is True
    again = layer_from_record(record, device="meta")
    assert type(again) is type(layer) and layer_record(again) == record
    shapes = {k: v.shape for k, v in layer.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes


def test_malformed_records_are_refused() -> None:
    good = layer_record(make_layer(StructureSpec("lowrank", 12, 18, rank=4), bias=False))

    def error(**change: object) -> str:
        with pytest.raises(ValueError) as err:
            layer_from_record({**good, **change})
        return str(err.value)

    assert error(kind="sparse") == (
        "unknown structured kind 'sparse'; tersa has lowrank, blockdense, blockshuffle"
    )
    assert error(rank="4") == "structured record key 'rank' must be an integer, got '4'"
    assert error(bias=1) == "structured record key 'bias' must be true or false, got 1"
    assert error(blocks=2) == "lowrank takes no blocks, got blocks=2"
    with pytest.raises(ValueError, match=r"^a structured record has exactly the keys"):
        layer_from_record({k: v for k, v in good.items() if k != "rank"})
