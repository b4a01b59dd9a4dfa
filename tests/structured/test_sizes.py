"""Structured sizes: parameter formulas, the fraction -> rank/blocks helpers, exact errors."""

from __future__ import annotations

import pytest

from tersa.structured.sizes import (
    StructureSpec,
    blockdense_for_fraction,
    blockshuffle_for_fraction,
    lowrank_for_fraction,
    sizes_for_fraction,
)

DENSE = [(64, 256), (256, 64), (96, 96), (120, 36), (2048, 8192)]  # (in, out)
FRACTIONS = [1.0, 0.63, 0.5, 0.32, 0.2]


@pytest.mark.parametrize(("n", "m"), DENSE)
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_fraction_helpers_stay_at_or_under_target(n: int, m: int, fraction: float) -> None:
    for spec in sizes_for_fraction(n, m, fraction, blocks=4).values():
        assert spec.weight_parameters <= fraction * n * m
        assert spec.fraction == spec.weight_parameters / (n * m)


@pytest.mark.parametrize(("n", "m"), DENSE)
def test_fraction_helpers_take_the_largest_setting(n: int, m: int) -> None:
    f = 0.4
    lr = lowrank_for_fraction(n, m, f)
    assert (lr.rank + 1) * (n + m) > f * n * m  # one more rank would not fit
    bd = blockdense_for_fraction(n, m, f, blocks=4)
    assert (bd.rank + 4) * (m + n // 4) > f * n * m  # nor one more row per block
    bs = blockshuffle_for_fraction(n, m, f)
    smaller = [b for b in range(1, bs.blocks) if n % b == 0 and m % b == 0]
    assert all(min(n, m) * (n + m) // b > f * n * m for b in smaller)


def test_paper_settings() -> None:
    # Transformer-xl FFN 2048 -> 8192: BlockShuffle B=2 is the "63%" and B=4 the "32%" model
    assert blockshuffle_for_fraction(2048, 8192, 0.63).blocks == 2
    assert blockshuffle_for_fraction(2048, 8192, 0.32).blocks == 4
    assert lowrank_for_fraction(2048, 8192, 0.63, multiple=256).rank == 1024
    assert lowrank_for_fraction(2048, 8192, 0.32, multiple=256).rank == 512
    sizes = sizes_for_fraction(2048, 8192, 0.63)
    assert (sizes["lowrank"].rank, sizes["blockdense"].rank) == (1032, 1212)


def test_rounding_to_a_multiple() -> None:
    assert lowrank_for_fraction(100, 100, 0.5, multiple=8).rank == 24  # floor(25) -> 24
    spec = blockdense_for_fraction(96, 96, 0.5, blocks=4, multiple=6)  # step lcm(4, 6) = 12
    assert spec.rank == 36 and spec.rank % 12 == 0  # floor(38.4) -> 36


def test_spec_parameter_formulas() -> None:
    assert StructureSpec("lowrank", 64, 256, rank=8).weight_parameters == 8 * (64 + 256)
    bd = StructureSpec("blockdense", 64, 256, rank=16, blocks=4)
    assert bd.weight_parameters == 16 * (256 + 64 // 4)
    bs = StructureSpec("blockshuffle", 64, 256, blocks=4)
    assert bs.weight_parameters == 64 * (64 + 256) // 4


def _message(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kw)
    return str(err.value)


def test_error_messages() -> None:
    assert _message(lowrank_for_fraction, 64, 64, 0.0) == "fraction must be in (0, 1], got 0.0"
    assert _message(lowrank_for_fraction, 64, 64, 1.5) == "fraction must be in (0, 1], got 1.5"
    assert _message(lowrank_for_fraction, 64, 64, 0.01) == (
        "fraction=0.01 is too small for LowRank on a [64, 64] weight: its smallest setting keeps "
        "0.03125 of the parameters"
    )
    assert _message(blockdense_for_fraction, 66, 64, 0.5, blocks=4) == (
        "BlockDense: blocks=4 must divide in_features=66 (each block maps in_features/blocks "
        "inputs)"
    )
    # gcd(66, 64) = 2: B = 2 keeps 64 * 130 / 2 of 66 * 64 parameters
    assert _message(blockshuffle_for_fraction, 66, 64, 0.2) == (
        "fraction=0.2 is too small for BlockShuffle on a [64, 66] weight: its smallest setting "
        "keeps 0.9848 of the parameters"
    )
    assert _message(StructureSpec, "blockdense", 64, 64, rank=10, blocks=4) == (
        "BlockDense: blocks=4 must divide rank=10 (each block has rank/blocks outputs)"
    )
    assert _message(StructureSpec, "blockshuffle", 64, 96, blocks=3) == (
        "BlockShuffle: blocks=3 must divide in_features=64 and out_features=96; common divisors: "
        "1, 2, 4, 8, 16, 32"
    )
    assert _message(StructureSpec, "lowrank", 64, 64, rank=0) == (
        "rank must be a positive integer, got 0"
    )
    assert _message(StructureSpec, "lowrank", 64, 64, rank=4, blocks=2) == (
        "lowrank takes no blocks, got blocks=2"
    )
    assert _message(StructureSpec, "blockdense", 64, 64, rank=4) == (
        "blockdense needs blocks, got blocks=None"
    )
    assert _message(StructureSpec, "monarch", 64, 64) == (
        "kind must be one of lowrank, blockdense, blockshuffle, got 'monarch'"
    )
