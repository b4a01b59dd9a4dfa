"""Helpers shared by the Triton launchers and kernels (imports triton: load only from ``triton.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def is_interpreted(x: torch.Tensor) -> bool:
    """True when a launch on ``x`` runs in the Triton interpreter.

    CPU tensors only run there; CUDA tensors too when ``TRITON_INTERPRET=1`` was set before the
    kernels were defined (the interpreter copies them to the host).
    """
    return x.device.type != "cuda" or bool(triton.knobs.runtime.interpret)


def m_bucket(m: int) -> int:
    """Autotuning key for the row count: the next power of two, capped at 4096.

    Prefill lengths vary from call to call; keying on the exact M would re-tune for each one.
    """
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def dot_dtype(x: torch.Tensor) -> tuple[tl.dtype, str]:
    """``tl.dot`` operand dtype and input precision for activations ``x``.

    16-bit inputs on CUDA feed the tensor cores in their own dtype (the upcast to fp32 after loading
    is exact, so the cast back is too). fp32 inputs, and everything in the interpreter (where bf16
    arithmetic is wrong), use fp32 with IEEE precision: TF32 would cost ~1e-3 relative error.
    """
    if x.dtype in (torch.float16, torch.bfloat16) and not is_interpreted(x):
        return (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16), "tf32"
    return tl.float32, "ieee"


@triton.jit
def swizzle_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a flat program id to a (row tile, column tile) pair, GROUP_M row tiles at a time.

    Programs that run together then share rows of the activations and columns of the weight in L2.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows
    return pid_m, pid_n
