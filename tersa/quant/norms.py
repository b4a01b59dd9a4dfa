"""Norm modules and their affine parameters, as the outlier transforms see them.

Every norm tersa folds into is ``y = γ ⊙ normalize(x) + β``: LayerNorm has both, the RMSNorms of
Llama-family models have no β. OS+ shifting needs a β on an RMSNorm, so :class:`BiasedRMSNorm`
replaces it (same arithmetic as the HF RMSNorm, plus a bias); exports record which norms carry one.
"""

from __future__ import annotations

import torch
from torch import nn


class BiasedRMSNorm(nn.Module):
    """``weight ⊙ x / rms(x) + bias``, computed exactly as HF Llama/Qwen/Mistral RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    @classmethod
    def from_norm(cls, norm: nn.Module) -> BiasedRMSNorm:
        """A biased copy of an HF RMSNorm (zero bias: the same outputs)."""
        out = cls(norm.weight.shape[0], eps=rms_eps(norm))
        out.to(device=norm.weight.device, dtype=norm.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(norm.weight)
        out.requires_grad_(norm.weight.requires_grad)
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype) + self.bias

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, bias=True"


def is_rms_norm(module: nn.Module) -> bool:
    """HF RMSNorms are plain modules named ``*RMSNorm`` with a weight and no bias."""
    name = type(module).__name__
    return (name.endswith("RMSNorm") or isinstance(module, nn.RMSNorm)) and not isinstance(
        module, BiasedRMSNorm
    )


def rms_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(norm, attr, None)
        if isinstance(value, float):
            return value
    return 1e-6


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | BiasedRMSNorm) or is_rms_norm(module)


def has_bias(norm: nn.Module) -> bool:
    return getattr(norm, "bias", None) is not None
