"""Sizes of the structured parameterisations: parameter counts, validity checks, and the rank or
block count that brings a dense ``[out, in]`` weight down to a target fraction of its parameters.

Counts are of the weight alone; a bias (``out`` parameters) is the same dense or structured. For a
layer ``in -> out`` (``N -> M``), ``D = min(N, M)``:

- LowRank ``U(Vx)``: ``R·(N + M)``.
- BlockDense ``U(V_b x)``, ``V_b`` of ``B`` blocks ``R/B x N/B``: ``R·(M + N/B)``.
- BlockShuffle, two ``B``-block diagonals ``D/B x N/B`` and ``M/B x D/B``: ``D·(N + M)/B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["lowrank", "blockdense", "blockshuffle"]
KINDS: tuple[Kind, ...] = ("lowrank", "blockdense", "blockshuffle")


def lowrank_parameters(in_features: int, out_features: int, rank: int) -> int:
    """``R·(N + M)``: ``V [R, N]`` and ``U [M, R]``."""
    return rank * (in_features + out_features)


def blockdense_parameters(in_features: int, out_features: int, rank: int, blocks: int) -> int:
    """``R·(M + N/B)``: ``B`` blocks ``[R/B, N/B]`` and a dense ``U [M, R]``."""
    return rank * (out_features + in_features // blocks)


def blockshuffle_parameters(in_features: int, out_features: int, blocks: int) -> int:
    """``D·(N + M)/B`` with ``D = min(N, M)``: blocks ``[B, D/B, N/B]`` and ``[B, M/B, D/B]``."""
    return min(in_features, out_features) * (in_features + out_features) // blocks


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _common_divisors(a: int, b: int) -> str:
    g = math.gcd(a, b)
    return ", ".join(str(d) for d in range(1, g + 1) if g % d == 0)


def check_lowrank(in_features: int, out_features: int, rank: int) -> None:
    """Raise ``ValueError`` unless all three sizes are positive."""
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        _check_positive(name, value)
    _check_positive("rank", rank)


def check_blockdense(in_features: int, out_features: int, rank: int, blocks: int) -> None:
    """Raise ``ValueError`` unless the sizes are positive and ``blocks`` divides ``in`` and ``rank``."""
    check_lowrank(in_features, out_features, rank)
    _check_positive("blocks", blocks)
    if in_features % blocks:
        raise ValueError(
            f"BlockDense: blocks={blocks} must divide in_features={in_features} (each block maps "
            f"in_features/blocks inputs)"
        )
    if rank % blocks:
        raise ValueError(
            f"BlockDense: blocks={blocks} must divide rank={rank} (each block has rank/blocks "
            f"outputs)"
        )


def check_blockshuffle(in_features: int, out_features: int, blocks: int) -> None:
    """Raise ``ValueError`` unless the sizes are positive and ``blocks`` divides ``in`` and ``out``."""
    check_lowrank(in_features, out_features, 1)
    _check_positive("blocks", blocks)
    if in_features % blocks or out_features % blocks:
        raise ValueError(
            f"BlockShuffle: blocks={blocks} must divide in_features={in_features} and "
            f"out_features={out_features}; common divisors: "
            f"{_common_divisors(in_features, out_features)}"
        )


@dataclass(frozen=True)
class StructureSpec:
    """One structured parameterisation of a dense ``[out_features, in_features]`` weight.

    ``rank`` is set for ``lowrank`` and ``blockdense``, ``blocks`` for ``blockdense`` and
    ``blockshuffle``; the other stays None. Validated on construction.
    """

    kind: Kind
    in_features: int
    out_features: int
    rank: int | None = None
    blocks: int | None = None

    def __post_init__(self) -> None:
        n, m, r, b = self.in_features, self.out_features, self.rank, self.blocks
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        wants = {
            "lowrank": (True, False),
            "blockdense": (True, True),
            "blockshuffle": (False, True),
        }
        for name, value, wanted in zip(("rank", "blocks"), (r, b), wants[self.kind], strict=True):
            if (value is not None) != wanted:
                need = "needs" if wanted else "takes no"
                raise ValueError(f"{self.kind} {need} {name}, got {name}={value}")
        r, b = r or 0, b or 0  # each is set where the kind uses it (checked above)
        if self.kind == "lowrank":
            check_lowrank(n, m, r)
        elif self.kind == "blockdense":
            check_blockdense(n, m, r, b)
        else:
            check_blockshuffle(n, m, b)

    @property
    def weight_parameters(self) -> int:
        """Parameters of the structured weight (formulas in the module docstring)."""
        n, m, r, b = self.in_features, self.out_features, self.rank or 0, self.blocks or 0
        if self.kind == "lowrank":
            return lowrank_parameters(n, m, r)
        if self.kind == "blockdense":
            return blockdense_parameters(n, m, r, b)
        return blockshuffle_parameters(n, m, b)

    @property
    def fraction(self) -> float:
        """``weight_parameters / (in_features · out_features)``."""
        return self.weight_parameters / (self.in_features * self.out_features)


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def _too_small(kind: str, fraction: float, n: int, m: int, smallest: float) -> ValueError:
    return ValueError(
        f"fraction={fraction} is too small for {kind} on a [{m}, {n}] weight: its smallest "
        f"setting keeps {smallest:.4g} of the parameters"
    )


def lowrank_for_fraction(
    in_features: int, out_features: int, fraction: float, multiple: int = 1
) -> StructureSpec:
    """The largest rank ``R`` with ``R·(N + M) <= fraction·N·M``, rounded down to ``multiple``.

    :raises ValueError: the fraction is outside (0, 1] or leaves a rank below ``multiple``.
    """
    _check_fraction(fraction)
    _check_positive("multiple", multiple)
    n, m = in_features, out_features
    rank = math.floor(fraction * n * m / (n + m)) // multiple * multiple
    while rank > 0 and lowrank_parameters(n, m, rank) > fraction * n * m:
        rank -= multiple  # float rounding in the division above
    if rank < 1:
        raise _too_small("LowRank", fraction, n, m, multiple * (n + m) / (n * m))
    return StructureSpec("lowrank", n, m, rank=rank)


def blockdense_for_fraction(
    in_features: int, out_features: int, fraction: float, blocks: int = 4, multiple: int = 1
) -> StructureSpec:
    """The largest rank ``R`` with ``R·(M + N/B) <= fraction·N·M`` for the given ``blocks``.

    ``R`` is rounded down to a multiple of ``lcm(blocks, multiple)`` (each block holds ``R/B``).

    :raises ValueError: the fraction is outside (0, 1], ``blocks`` does not divide ``in_features``,
        or no rank of that step fits.
    """
    _check_fraction(fraction)
    _check_positive("multiple", multiple)
    check_blockdense(in_features, out_features, blocks, blocks)  # rank=blocks: checks N % B
    n, m = in_features, out_features
    step = math.lcm(blocks, multiple)
    rank = math.floor(fraction * n * m / (m + n // blocks)) // step * step
    while rank > 0 and blockdense_parameters(n, m, rank, blocks) > fraction * n * m:
        rank -= step  # float rounding in the division above
    if rank < 1:
        raise _too_small("BlockDense", fraction, n, m, step * (m + n // blocks) / (n * m))
    return StructureSpec("blockdense", n, m, rank=rank, blocks=blocks)


def blockshuffle_for_fraction(
    in_features: int, out_features: int, fraction: float
) -> StructureSpec:
    """The fewest blocks ``B`` with ``D·(N + M)/B <= fraction·N·M`` that divide both ``N`` and ``M``.

    Blocks only come in divisors, so the result can sit well under the target (``N = M = 96`` at
    0.63 needs ``B >= 3.2``: ``B = 4`` gives 0.5).

    :raises ValueError: the fraction is outside (0, 1], or no common divisor is large enough.
    """
    _check_fraction(fraction)
    check_blockshuffle(in_features, out_features, 1)
    n, m = in_features, out_features
    need = min(n, m) * (n + m) / (fraction * n * m)  # the smallest real block count
    for blocks in range(max(1, math.ceil(need - 1e-9)), math.gcd(n, m) + 1):
        fits = blockshuffle_parameters(n, m, blocks) <= fraction * n * m
        if n % blocks == 0 and m % blocks == 0 and fits:
            return StructureSpec("blockshuffle", n, m, blocks=blocks)
    g = math.gcd(n, m)
    raise _too_small("BlockShuffle", fraction, n, m, blockshuffle_parameters(n, m, g) / (n * m))


def sizes_for_fraction(
    in_features: int, out_features: int, fraction: float, blocks: int = 4, multiple: int = 1
) -> dict[Kind, StructureSpec]:
    """The three parameterisations of an ``in -> out`` layer at ``<= fraction`` of its parameters.

    LowRank and BlockDense (with ``blocks``) round the rank down to ``multiple``; BlockShuffle takes
    the fewest blocks that fit. Raises ``ValueError`` as the per-kind helpers do.

    Example: ``sizes_for_fraction(2048, 8192, 0.63)`` gives LowRank R=1032 (0.630), BlockDense B=4
    R=1212 (0.629) and BlockShuffle B=2 (0.625, the paper's "63%" setting).
    """
    n, m = in_features, out_features
    return {
        "lowrank": lowrank_for_fraction(n, m, fraction, multiple),
        "blockdense": blockdense_for_fraction(n, m, fraction, blocks, multiple),
        "blockshuffle": blockshuffle_for_fraction(n, m, fraction),
    }
