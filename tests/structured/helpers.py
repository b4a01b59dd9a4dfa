"""Shared helpers of the structured tests: calibration ids and running recipe stages."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tersa.context import StageContext
from tersa.models.adapters import get_adapter
from tersa.pipeline import apply_stage_list
from tersa.recipe import parse_recipe


def calibration(n: int = 8, t: int = 32) -> torch.Tensor:
    """``[n, t]`` token ids, the same every call."""
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(0))


def run(
    model: nn.Module, stages: list[dict], ids: torch.Tensor | None = None
) -> tuple[nn.Module, StageContext, list[dict[str, Any]]]:
    """Apply recipe stages (validated by parse_recipe) to ``model`` on the CPU."""
    stage_list = parse_recipe({"model": "m", "stages": stages}).stages
    ctx = StageContext(
        adapter=get_adapter(model),
        device=torch.device("cpu"),
        calibration_ids=calibration() if ids is None else ids,
        batch_size=4,
    )
    model, timings = apply_stage_list(model, stage_list, ctx)
    return model, ctx, timings
