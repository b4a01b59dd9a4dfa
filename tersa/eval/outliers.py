"""Activation outlier profile: how far the largest input channel of each linear sits above the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tersa.calib import BlockCache, run_blockwise
from tersa.calib.stats import observe_inputs
from tersa.models.adapters import Adapter, get_blocks
from tersa.quant.replace import find_linears


@dataclass(frozen=True)
class OutlierRow:
    """One linear's input: ``ratio`` = largest channel max|x| / median channel max|x|."""

    block: int
    linear: str
    max_abs: float
    median_abs: float

    @property
    def ratio(self) -> float:
        return self.max_abs / max(self.median_abs, 1e-12)


@torch.no_grad()
def outlier_profile(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> list[OutlierRow]:
    """Per-channel input ranges of every linear in every block, from ``input_ids`` ``[N, T]``.

    Runs block by block (one block's activations at a time) and leaves the model unchanged.
    """
    rows: list[OutlierRow] = []

    def process(i: int, block: nn.Module, cache: BlockCache) -> None:
        linears = find_linears(block)
        with observe_inputs(linears) as stats:
            cache.run(block)
        for name, s in stats.items():
            absmax = s.absmax
            rows.append(OutlierRow(i, name, absmax.max().item(), absmax.median().item()))

    run_blockwise(model, get_blocks(model, adapter), input_ids, process, batch_size, device)
    return rows
