"""Running a model whose weights stay on the CPU (larger than the accelerator's memory).

Stages already work one block at a time (see :mod:`tersa.calib`); whole-model forward passes
(evaluation) go through accelerate's CPU offload hooks, which move each module's tensors to the
compute device just before it runs and drop them afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_submodules
from torch import nn


@contextmanager
def offloaded(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Forward passes run on ``device`` while the weights stay on the CPU; hooks removed after."""
    cpu_offload(model, execution_device=device, offload_buffers=True)
    try:
        yield model
    finally:
        remove_hook_from_submodules(model)


@contextmanager
def onloaded(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` on ``device`` for the duration (one block at a time), then back where it was."""
    home = next(iter(module.parameters()), None)
    home_device = home.device if home is not None else device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home_device)
