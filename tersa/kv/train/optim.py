"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule (pure)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tersa.kv.train.recipe import TrainingSection


def build_optimizer(model: nn.Module, cfg: TrainingSection) -> torch.optim.AdamW:
    """AdamW over two groups: matrices and embeddings decay, vectors (biases, norm gains) do not.

    The forget gate bias must not decay: its +3 start is what gives the recurrence a memory.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


def lr_at(step: int, steps: int, peak: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate of ``step`` (0-based) of ``steps``: linear warmup over ``warmup_steps`` to
    ``peak``, then a cosine from ``peak`` down to ``min_lr`` at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
