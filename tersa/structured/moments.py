"""Second moments ``XᵀX/n`` of the inputs of a block's linears, gathered with forward hooks.

The fits of every structured kind depend on the calibration inputs only through this moment
(:mod:`tersa.structured.fit_math`), so no token is kept: each call adds its (subsampled) tokens'
Gram matrix, computed in float32 on the compute device, to a float64 sum. Linears that read the
same tensor (Llama's gate and up projections) share one Gram matrix per call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class MomentSum:
    """``Σ xᵀx`` ``[N, N]`` (float64) over the tokens added so far, and their count."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, gram: torch.Tensor, tokens: int) -> None:
        """Add ``gram = xᵀx`` ``[N, N]`` of ``tokens`` tokens."""
        g = gram.to(torch.float64)
        self.total = g if self.total is None else self.total + g
        self.count += tokens

    def moment(self) -> torch.Tensor:
        """``XᵀX / n`` ``[N, N]`` (float64)."""
        if self.total is None or self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.total / self.count


def token_rows(n: int, keep: float, seed: int, device: torch.device) -> torch.Tensor | None:
    """A random subset of ``ceil(keep·n)`` of ``n`` token rows (None: keep them all)."""
    if keep >= 1.0:
        return None
    generator = torch.Generator().manual_seed(seed)
    k = max(1, math.ceil(keep * n))
    return torch.randperm(n, generator=generator)[:k].to(device)


@contextmanager
def observe_moments(
    modules: dict[str, nn.Module], keep: float = 1.0, seed: int = 0
) -> Iterator[dict[str, MomentSum]]:
    """Accumulate the input moment of each module while the caller runs the block.

    :param modules: ``{name: linear}``; each is called with its input ``[..., N]`` first.
    :param keep: share of each call's tokens used (the ``k``-th call of every module picks the
        same rows, seeded by ``seed + k``, so linears of one block see the same tokens).
    :yields: ``{name: MomentSum}``, filled once the ``with`` body has run the block.
    """
    sums = {name: MomentSum() for name in modules}
    calls = dict.fromkeys(modules, 0)
    last: list[Any] = [None, None, None]  # (input tensor, call index, (gram, tokens))

    def hook_for(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple) -> None:
            x, k = args[0], calls[name]
            calls[name] += 1
            if last[0] is x and last[1] == k:
                sums[name].add(*last[2])
                return
            x2 = x.detach().reshape(-1, x.shape[-1])  # [n, N]
            rows = token_rows(x2.shape[0], keep, seed + k, x2.device)
            xs = (x2 if rows is None else x2[rows]).float()
            gram = (xs.t() @ xs, xs.shape[0])  # fp32 GEMM: float64 is many times slower on CPUs
            last[:] = [x, k, gram]
            sums[name].add(*gram)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()
        last[:] = [None, None, None]
