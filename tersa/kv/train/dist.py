"""Single-process or ``torchrun`` DDP on the gloo backend (CPU): who am I, and sync points."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place: ``rank`` of ``world``; ``owned``: we started the process group."""

    rank: int = 0
    world: int = 1
    owned: bool = False

    @property
    def main(self) -> bool:
        """The process that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean of ``values`` over all processes (for logging)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP when there are several processes (gradients averaged)."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def setup() -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else single-process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), owned=True)
