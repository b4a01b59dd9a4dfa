"""The factors of a structured layer are linear modules, so quantization finds them.

A dense factor is a bias-free ``nn.Linear``; a block-diagonal one is a :class:`BlockDiagonal` of
``B`` bias-free ``nn.Linear`` blocks. ``tersa.quant.replace.find_linears`` sees every one of them,
and a ``quantize`` stage swaps each for a :class:`~tersa.quant.qlinear.QuantLinear` like any other
linear; the structured layer keeps working because it only calls its factors (and reads their
weights through :func:`factor_weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from tersa.kernels.block_diag_matmul import block_diag_matmul

Device = torch.device | str | None


def factor_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a factor: an ``nn.Linear``'s own, or a quantized layer's
    dequantized weight (anything with ``dequantized_weight()``, e.g. ``QuantLinear``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    dequantized = getattr(module, "dequantized_weight", None)
    if dequantized is None:
        raise TypeError(f"a structured factor must be a linear layer, got {type(module).__name__}")
    return dequantized()


def is_float_factor(module: nn.Module) -> bool:
    """Whether a factor is a plain float ``nn.Linear`` (not a quantized replacement)."""
    return type(module) is nn.Linear


def bare_linear(
    in_features: int, out_features: int, device: Device, dtype: torch.dtype | None
) -> nn.Linear:
    """A bias-free ``nn.Linear`` (``nn.Linear``'s own init: uniform in ``±1/√in``)."""
    return nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)


class BlockDiagonal(nn.Module):
    """``y = diag(W_0, ..., W_{B-1}) x``: ``x [..., B·i] -> y [..., B·o]``, no bias.

    Block ``k`` is ``linears[k]``, an ``nn.Linear(i, o)`` reading input slice ``k``. With float
    blocks the forward is one :func:`~tersa.kernels.block_diag_matmul.block_diag_matmul` on the
    stacked weights; once a block has been replaced (by a
    quantized layer) every block runs on its own slice.

    :param blocks: ``B``; it must divide both feature counts (checked by the owning layer).
    """

    def __init__(
        self,
        blocks: int,
        in_features: int,
        out_features: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        i, o = in_features // blocks, out_features // blocks
        self.linears = nn.ModuleList(bare_linear(i, o, device, dtype) for _ in range(blocks))

    @property
    def blocks(self) -> int:
        return len(self.linears)

    def stacked_weight(self) -> torch.Tensor:
        """The blocks ``[B, o, i]`` (differentiable; dequantized for quantized blocks)."""
        return torch.stack([factor_weight(m) for m in self.linears])

    @torch.no_grad()
    def copy_(self, blocks: torch.Tensor) -> None:
        """Set float blocks from ``blocks [B, o, i]`` (cast to the blocks' dtype)."""
        for linear, w in zip(self.linears, blocks.unbind(0), strict=True):
            linear.weight.copy_(w.to(linear.weight.dtype))

    def reset_parameters(self) -> None:
        for linear in self.linears:
            linear.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., B·i] -> [..., B·o]``."""
        if all(is_float_factor(m) for m in self.linears):
            # The stack is a transient copy of the blocks: keeping it would double the factor's
            # memory, and next to the matmul over a batch of tokens the copy is cheap (for a few
            # tokens the owning layer's pre-merge skips this path anyway).
            return block_diag_matmul(x, torch.stack([m.weight for m in self.linears]))
        parts = x.split(self.in_features // self.blocks, dim=-1)
        return torch.cat([m(p) for m, p in zip(self.linears, parts, strict=True)], dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, blocks={self.blocks}"
