"""The structured replacements of ``nn.Linear(in, out)`` (StructuredFFN, arXiv 2406.16450).

For ``N = in``, ``M = out``, ``D = min(N, M)``; parameter counts exclude the bias (``M`` more
with it), FLOPs per token are ``2·params`` (+ ``M`` for the bias):

- :class:`LowRank` ``y = U(Vx)``: ``R·(N + M)`` parameters.
- :class:`BlockDense` ``y = U(V_b x)``, ``V_b`` block diagonal: ``R·(M + N/B)``.
- :class:`BlockShuffle` ``y = f⁻¹(W2_b f(W1_b x))``, two block diagonals around a stride shuffle
  ``f`` (Monarch-style): ``D·(N + M)/B``.

Each is fitted to a dense weight by :meth:`~tersa.structured.base.StructuredLinear.init_from_dense`
(optionally on calibration inputs); the factors otherwise start like ``nn.Linear`` weights of their
shapes. Every factor is a linear module (:mod:`tersa.structured.factors`): a bias-free
``nn.Linear``, or a :class:`~tersa.structured.factors.BlockDiagonal` of them.
"""

from __future__ import annotations

import torch
from torch import nn

from tersa.structured.base import StructuredLinear
from tersa.structured.block_math import (
    block_diag_dense,
    blockdense_fit,
    blockshuffle_dense,
    blockshuffle_fit,
)
from tersa.structured.factors import BlockDiagonal, bare_linear, factor_weight
from tersa.structured.fit_math import lowrank_factors
from tersa.structured.sizes import (
    blockdense_parameters,
    blockshuffle_parameters,
    check_blockdense,
    check_blockshuffle,
    check_lowrank,
    lowrank_parameters,
)

Device = torch.device | str | None


def _copy(linear: torch.nn.Linear, value: torch.Tensor) -> None:
    linear.weight.copy_(value.to(linear.weight.dtype))


class _ThroughRank(StructuredLinear):
    """``y = u(v(x)) + b``: a factor ``v`` into ``rank`` features, then a dense ``u``."""

    v: nn.Module
    u: nn.Module

    def reset_parameters(self) -> None:
        """Each factor like an ``nn.Linear`` of its (block) shape; the bias like the dense one's."""
        self.v.reset_parameters()
        self.u.reset_parameters()
        self.reset_bias()

    def factored(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))  # [..., rank] -> [..., out]


class LowRank(_ThroughRank):
    """``y = U (V x) + b`` with ``V [rank, in]``, ``U [out, rank]``: the linears ``v`` and ``u``.

    ``num_parameters() = rank·(in + out) (+ out)``; ``flops_per_token() = 2·rank·(in + out)
    (+ out)``. The fit is the truncated SVD of ``W``, or of ``W L`` with ``L Lᵀ = XᵀX/n`` when
    calibration inputs are given (activation-aware: optimal for the output error).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        merge_below: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_lowrank(in_features, out_features, rank)
        super().__init__(in_features, out_features, bias, merge_below, device, dtype)
        self.rank = rank
        self.v = bare_linear(in_features, rank, device, dtype)
        self.u = bare_linear(rank, out_features, device, dtype)
        self.reset_bias()

    def dense_weight(self) -> torch.Tensor:
        return factor_weight(self.u) @ factor_weight(self.v)

    def weight_parameters(self) -> int:
        return lowrank_parameters(self.in_features, self.out_features, self.rank)

    def _fit(self, w: torch.Tensor, c: torch.Tensor | None, iters: int) -> None:
        u, v = lowrank_factors(w, self.rank, c)
        _copy(self.u, u)
        _copy(self.v, v)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, " + (
            f"bias={self.bias is not None}, merge_below={self.merge_below}"
        )


class BlockDense(_ThroughRank):
    """``y = U (V_b x) + b``: ``V_b`` block diagonal, ``blocks`` blocks ``[rank/blocks,
    in/blocks]`` (the :class:`~tersa.structured.factors.BlockDiagonal` ``v``), then a dense
    ``U [out, rank]`` (the linear ``u``).

    ``num_parameters() = rank·(out + in/blocks) (+ out)``; ``flops_per_token()`` is twice that
    (+ out). ``blocks`` must divide ``in`` and ``rank``. The fit: per-block (weighted) SVDs of
    ``W``'s column blocks, the least-squares ``U``, then alternating least squares on the
    calibration inputs (:func:`~tersa.structured.block_math.blockdense_fit`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        blocks: int,
        bias: bool = True,
        merge_below: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_blockdense(in_features, out_features, rank, blocks)
        super().__init__(in_features, out_features, bias, merge_below, device, dtype)
        self.rank, self.blocks = rank, blocks
        self.v = BlockDiagonal(blocks, in_features, rank, device, dtype)
        self.u = bare_linear(rank, out_features, device, dtype)
        self.reset_bias()

    def dense_weight(self) -> torch.Tensor:
        return factor_weight(self.u) @ block_diag_dense(self.v.stacked_weight())

    def weight_parameters(self) -> int:
        n, m = self.in_features, self.out_features
        return blockdense_parameters(n, m, self.rank, self.blocks)

    def _fit(self, w: torch.Tensor, c: torch.Tensor | None, iters: int) -> None:
        u, v = blockdense_fit(w, self.rank, self.blocks, c, iters)
        _copy(self.u, u)
        self.v.copy_(v)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, " + (
            f"blocks={self.blocks}, bias={self.bias is not None}, merge_below={self.merge_below}"
        )


class BlockShuffle(StructuredLinear):
    """``y = f⁻¹(W2_b f(W1_b x)) + b``: two block diagonals around a stride shuffle (Monarch).

    With ``D = min(in, out)`` and ``B = blocks`` (both factors are
    :class:`~tersa.structured.factors.BlockDiagonal`): ``w1 [B, D/B, in/B]`` maps ``x`` to ``h [D]``;
    ``f`` regroups ``h`` by stride (block ``j`` takes features ``j, j+B, ...``, so every
    second-stage block sees every first-stage block); ``w2 [B, out/B, D/B]`` maps that to ``o``,
    and ``f⁻¹`` interleaves the output blocks (``y[i·B + j] = o[j·out/B + i]``), as in the
    reference code. ``num_parameters() = D·(in + out)/B (+ out)``; ``flops_per_token()`` twice
    that (+ out). ``blocks`` must divide ``in`` and ``out``.

    The fit: the Frobenius-optimal projection (one truncated SVD per pair of blocks), then
    alternating least squares on calibration inputs
    (:func:`~tersa.structured.block_math.blockshuffle_fit`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: int,
        bias: bool = True,
        merge_below: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_blockshuffle(in_features, out_features, blocks)
        super().__init__(in_features, out_features, bias, merge_below, device, dtype)
        self.blocks = blocks
        self.mid_features = min(in_features, out_features)
        d = self.mid_features
        self.w1 = BlockDiagonal(blocks, in_features, d, device, dtype)
        self.w2 = BlockDiagonal(blocks, d, out_features, device, dtype)
        self.reset_bias()

    def reset_parameters(self) -> None:
        """Each block like an ``nn.Linear`` of its shape; the bias like the dense layer's."""
        self.w1.reset_parameters()
        self.w2.reset_parameters()
        self.reset_bias()

    def factored(self, x: torch.Tensor) -> torch.Tensor:
        b, d = self.blocks, self.mid_features
        h = self.w1(x)  # [..., D]
        z = h.unflatten(-1, (d // b, b)).transpose(-1, -2).flatten(-2)  # f: z[j, i] = h[i·B + j]
        o = self.w2(z)  # [..., out], block-major
        return o.unflatten(-1, (b, self.out_features // b)).transpose(-1, -2).flatten(-2)  # f⁻¹

    def dense_weight(self) -> torch.Tensor:
        return blockshuffle_dense(self.w1.stacked_weight(), self.w2.stacked_weight())

    def weight_parameters(self) -> int:
        return blockshuffle_parameters(self.in_features, self.out_features, self.blocks)

    def _fit(self, w: torch.Tensor, c: torch.Tensor | None, iters: int) -> None:
        w1, w2 = blockshuffle_fit(w, self.blocks, c, iters)
        self.w1.copy_(w1)
        self.w2.copy_(w2)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, blocks={self.blocks}, " + (
            f"bias={self.bias is not None}, merge_below={self.merge_below}"
        )
