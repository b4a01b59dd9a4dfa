"""Devices and memory."""

from __future__ import annotations

import ctypes
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


MMAP_THRESHOLD = 1 << 20  # bytes; see return_freed_memory


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve allocations of at least ``threshold`` bytes with ``mmap``, so a freed
    tensor's memory goes back to the system at once. Returns False where this is not glibc.

    Why: glibc raises its mmap threshold after each large free (up to 32 MiB), and from then on
    freed activation buffers stay in its heap, fragmented. Block-by-block calibration allocates
    and frees buffers of changing sizes for every block; on the embedded model QDrop's resident
    memory crept from 1.3 to 2.3 GiB over 30 blocks while the live tensors shrank (see README,
    QDrop memory). A fixed threshold keeps it flat. It is process-wide, so only entry points
    (the CLI, bench scripts) call it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries: nothing to set
        return False
    m_mmap_threshold = -3  # malloc.h's M_MMAP_THRESHOLD
    return bool(libc.mallopt(m_mmap_threshold, threshold))
