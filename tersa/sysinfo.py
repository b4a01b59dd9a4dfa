"""Devices and memory."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from tersa.errors import RecipeError


def resolve_device(name: str, dtype: torch.dtype) -> torch.device:
    """``auto`` → CUDA when present, else CPU; refuses fp16 on CPU (about 100× slower there)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            "device 'cuda' was asked for but no CUDA device is available; use auto or cpu"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu" and dtype == torch.float16:
        raise RecipeError(
            "dtype float16 on the CPU is about 100x slower than float32 or bfloat16; "
            "use dtype: float32 or bfloat16"
        )
    return torch.device(name)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()
    return pages * resource.getpagesize()
