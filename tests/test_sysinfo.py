"""Process-level memory helpers."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Free a 24 MiB tensor (glibc then raises its mmap threshold), allocate a smaller one that now comes
# from the heap, pin the heap top with a small tensor so it cannot be trimmed, free the middle one:
# without a fixed threshold its pages stay resident.
SCENARIO = """
import json, sys, torch
from tersa.sysinfo import current_rss_bytes, return_freed_memory
fixed = return_freed_memory() if sys.argv[1] == "fixed" else None
a = torch.ones(24 * 2**20 // 4); del a
before = current_rss_bytes()
b = torch.ones(16 * 2**20 // 4)
pin = torch.ones(1024)
del b
print(json.dumps({"fixed": fixed, "kept_mib": (current_rss_bytes() - before) / 2**20}))
"""


def _kept_mib(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCENARIO, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_return_freed_memory_gives_freed_tensors_back() -> None:
    default, fixed = _kept_mib("default"), _kept_mib("fixed")
    assert fixed["fixed"] is True
    # Default glibc keeps the freed 16 MiB buffer resident; with the fixed threshold it is gone.
    assert default["kept_mib"] > 12, default
    assert fixed["kept_mib"] < 8, fixed
