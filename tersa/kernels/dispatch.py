"""Where a kernel call runs: Triton for CUDA tensors (when triton is installed), else torch."""

from __future__ import annotations

import importlib.util
from functools import cache

import torch


@cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it has no macOS or Windows wheels)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is on a CUDA device and triton is installed."""
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    return on_cuda and triton_available()
